"""Policy specs: canonical names, aliases, bare files, and plug-ins by dotted path or entry point."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import zipfile

import pytest
import torch
import yaml

from agents import FixedBitsPolicy, canonical_name, make_policy
from agents.registry import POLICIES, kind_of_file, parse_spec

NAMES = ("entropy_mean", "rarity_mean", "attn_var_mean", "token_acc_mean")
BITS = (2, 4, 8, 16)

PLUGIN = '''
import numpy as np
from agents.base import Policy

class AlwaysMost(Policy):
    """Keeps every block at the most bits, or at the width given as the spec's argument."""

    def __init__(self, observation_names, bits, width="16"):
        super().__init__(observation_names, bits)
        self.action = self.bits.index(int(width))

    def act(self, obs2d, deterministic=True):
        return np.full(len(obs2d), self.action, dtype=np.int64)
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A policy class in a module outside the package, importable as ``kvgym_test_plugin``."""
    (tmp_path / "kvgym_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "kvgym_test_plugin"
    sys.modules.pop("kvgym_test_plugin", None)


# --------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("fixed:4", "fixed:4"),
        (" fixed:04 ", "fixed:4"),
        ("fixed:16", "fp16"),
        ("fp16", "fp16"),
        ("rule", "rule"),
        ("rule:1,2,3", "rule"),
        ("mlp:runs/controller.pt", "mlp"),
        ("sb3:runs/ppo.zip", "ppo"),
        ("sb3:A2C:runs/a2c.zip", "a2c"),
        ("mlp-oracle=mlp:runs/o.pt", "mlp-oracle"),
        ("k4=fixed:4", "k4"),
    ],
)
def test_canonical_name_without_building(spec, name):
    assert canonical_name(spec) == name  # none of these files exist: nothing is built


def test_built_policies_carry_their_canonical_name():
    for spec in ("fixed:4", "fixed:16", "fp16", "rule", "rule:1,2,3", "lo=fixed:2"):
        assert make_policy(spec, NAMES, BITS).name == canonical_name(spec)
    assert FixedBitsPolicy(NAMES, BITS, 16).name == "fp16"  # built directly, the same name


def test_two_policies_of_one_kind_coexist_under_aliases():
    low, high = make_policy("low=rule:0,0,0", NAMES, BITS), make_policy("high=rule:9,9,9", NAMES, BITS)
    assert (low.name, high.name) == ("low", "high") and low.thresholds != high.thresholds


def test_bad_arguments_fail_before_building():
    with pytest.raises(ValueError, match="takes no argument"):
        canonical_name("fp16:8")
    with pytest.raises(ValueError, match="integer"):
        canonical_name("fixed:four")
    with pytest.raises(ValueError, match=r"known: .*fixed.*fp16.*mlp.*rule.*sb3"):
        canonical_name("nope")


# ---------------------------------------------------------------------------------------- bare files
def test_bare_files_are_recognised_by_content(tmp_path):
    rule = tmp_path / "thresholds.txt"
    rule.write_text(yaml.safe_dump({"feature": "entropy_mean", "bits": list(BITS), "thresholds": [1, 2, 3]}))
    assert kind_of_file(rule) == "rule"
    policy = make_policy(str(rule), NAMES, BITS)
    assert policy.name == "rule" and policy.thresholds == (1.0, 2.0, 3.0)

    torch_file = tmp_path / "controller.bin"
    torch.save({"state_dict": {}}, torch_file)
    assert kind_of_file(torch_file) == "mlp"

    sb3_file = tmp_path / "agent"
    with zipfile.ZipFile(sb3_file, "w") as archive:
        archive.writestr("data", "{}")
        archive.writestr("policy.pth", b"")
    assert kind_of_file(sb3_file) == "sb3"


def test_bare_files_fall_back_to_suffix_and_fail_clearly(tmp_path):
    empty_pt = tmp_path / "x.pt"
    empty_pt.write_bytes(b"not a torch file")
    assert kind_of_file(empty_pt) == "mlp"  # the MLP loader then says what is wrong with it
    odd = tmp_path / "notes.txt"
    odd.write_text("hello\n")
    with pytest.raises(ValueError, match="cannot tell which policy"):
        make_policy(str(odd), NAMES, BITS)
    with pytest.raises(FileNotFoundError, match="not found"):
        make_policy(str(tmp_path / "missing.pt"), NAMES, BITS)


def test_spec_parsing_keeps_kind_arguments_whole():
    assert parse_spec("sb3:A2C:runs/a.zip").arg == "A2C:runs/a.zip"
    assert parse_spec("rule:a=b.yaml").alias is None  # '=' inside an argument is no alias
    assert parse_spec("pkg.mod:Cls:arg").kind == "pkg.mod:Cls" and parse_spec("pkg.mod:Cls:arg").arg == "arg"


# ------------------------------------------------------------------------------------------ plug-ins
def test_plugin_class_by_dotted_path(plugin_module):
    policy = make_policy(f"{plugin_module}:AlwaysMost", NAMES, BITS)
    assert type(policy).__name__ == "AlwaysMost" and int(policy.predict([0.0] * 4)[0]) == 3
    assert policy.name == canonical_name(f"{plugin_module}:AlwaysMost") == f"{plugin_module}:AlwaysMost"
    with_arg = make_policy(f"most4={plugin_module}:AlwaysMost:4", NAMES, BITS)
    assert with_arg.name == "most4" and int(with_arg.predict([0.0] * 4)[0]) == 1
    with pytest.raises(ValueError, match="not a Policy subclass"):
        make_policy(f"{plugin_module}:np", NAMES, BITS)


def test_plugin_by_entry_point_is_loaded_on_first_use(plugin_module, monkeypatch):
    ep = importlib.metadata.EntryPoint("always-most", f"{plugin_module}:AlwaysMost", "kvgym.policies")
    calls = []

    def entry_points(group=None, **_):
        calls.append(group)
        return importlib.metadata.EntryPoints([ep] if group == "kvgym.policies" else [])

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert "always-most" not in POLICIES  # not imported before it is asked for
    try:
        policy = make_policy("always-most:8", NAMES, BITS)
        assert type(policy).__name__ == "AlwaysMost" and int(policy.predict([0.0] * 4)[0]) == 2
        assert policy.name == "always-most" and "always-most" in POLICIES
        assert calls == ["kvgym.policies"]
        with pytest.raises(ValueError, match="known: .*always-most"):
            make_policy("nope", NAMES, BITS)
    finally:
        POLICIES.unregister("always-most")
