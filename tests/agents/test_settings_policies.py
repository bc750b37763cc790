"""Policies over v2 menus: (key, value) settings, sink-token options in fixed specs, layer groups."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "envs"))
from _tiny_env import make_env  # noqa: E402

from agents import EntropyRulePolicy, FixedBitsPolicy, make_policy  # noqa: E402
from agents.registry import canonical_name, env_overrides  # noqa: E402
from agents.rollout import rollout  # noqa: E402

NAMES = ("entropy_mean", "progress", "last_bits")
MENU = (2, (4, 2), (2, 4), 4, 16)


def obs_with(entropies) -> np.ndarray:
    e = np.atleast_1d(np.asarray(entropies, dtype=np.float32))
    obs = np.zeros((len(e), len(NAMES)), dtype=np.float32)
    obs[:, 0] = e
    return obs


@pytest.mark.parametrize(
    "spec, name",
    [("fixed:4", "fixed:4"), ("fixed:k4v4", "fixed:4"), ("fixed:k4v2", "fixed:k4v2"), ("fixed:K4V2+s4", "fixed:k4v2+s4"),
     ("fixed:4+s0", "fixed:4"), ("fixed:16+s4", "fp16"), ("fixed:k16v16", "fp16"), ("fp16", "fp16")],
)
def test_fixed_canonical_names(spec, name):
    assert canonical_name(spec) == name


@pytest.mark.parametrize(
    "spec, fix", [("fixed:k4v5", "unsupported bit-width"), ("fixed:k4v2+x3", r"\+s<N>"), ("fixed:k4", "integer")]
)
def test_bad_fixed_specs(spec, fix):
    with pytest.raises(ValueError, match=fix):
        canonical_name(spec)


def test_fixed_policy_on_a_pair_menu():
    policy = make_policy("fixed:k4v2", NAMES, [2, [4, 2], [2, 4], 4, 16])
    assert policy.bits == MENU and policy.value == (4, 2) and policy.name == "fixed:k4v2"
    actions, _ = policy.predict(obs_with([0.0, 9.0]))
    assert actions.tolist() == [1, 1]
    with pytest.raises(ValueError, match="not one of the env's settings"):
        FixedBitsPolicy(NAMES, MENU, (8, 4))


def test_bits_to_action_orders_by_mean_bits_then_key_bits():
    policy = FixedBitsPolicy(NAMES, MENU, 4)
    got = policy.bits_to_action([1, 2, 2.5, 3, 3.5, 4, 20])
    assert [MENU[a] for a in got] == [2, 2, (4, 2), (4, 2), 4, 4, 16]


def test_rule_climbs_the_menu_by_cost_and_saves_pairs(tmp_path):
    rule = EntropyRulePolicy(NAMES, MENU, thresholds=(1.0, 2.0, 3.0, 4.0))
    actions, _ = rule.predict(obs_with([0.5, 1.5, 2.5, 3.5, 4.5]))
    assert [MENU[a] for a in actions] == [2, (4, 2), (2, 4), 4, 16]
    assert rule.chosen_bits(np.array([0.5, 1.5, 4.5])).tolist() == [2, 3, 16]
    path = rule.save(tmp_path / "rule.yaml")
    again = EntropyRulePolicy.load(path, NAMES, [2, [4, 2], [2, 4], 4, 16])
    assert again.thresholds == rule.thresholds and again.bits == MENU
    with pytest.raises(ValueError, match="calibrated for bits"):
        EntropyRulePolicy.load(path, NAMES, (2, 4, 8, 16, 3))


@pytest.mark.parametrize("spec", ["fixed:k4v2", "rule:1,2,3,4"])
def test_layer_groups_give_every_group_the_choice(spec):
    policy = make_policy(spec, NAMES, MENU, layer_groups=3)
    one, _ = policy.predict(obs_with(1.5)[0])
    batch, _ = policy.predict(obs_with([0.5, 1.5]))
    assert one.shape == (3,) and batch.shape == (2, 3) and (batch[1] == one).all() and len(set(one)) == 1


def test_env_overrides_of_fixed_specs():
    plain = SimpleNamespace(bits=(2, 4, 8, 16), sink_tokens=0)
    sinks = SimpleNamespace(bits=(2, (4, 2), 4), sink_tokens=4)
    assert env_overrides("fixed:4", plain) == {} and env_overrides("fp16", plain) == {}
    assert env_overrides("fixed:k4v2+s4", plain) == {"sink_tokens": 4, "bits": ((4, 2),)}
    assert env_overrides("fixed:k4v2+s4", sinks) == {}
    assert env_overrides("fixed:4", sinks) == {"sink_tokens": 0}
    assert env_overrides("fp16", sinks) == {"bits": (16,)}  # sinks change nothing at 16 bits
    assert env_overrides("rule", sinks) == {}


def test_fixed_policy_refuses_an_env_without_its_sinks(tiny_model):
    env = make_env(tiny_model, bits=(2, (4, 2)), sink_tokens=2)
    with pytest.raises(ValueError, match="sink_tokens=4.*env.sibling"):
        make_policy("fixed:k4v2+s4", env=env)
    assert make_policy("fixed:k4v2+s2", env=env).name == "fixed:k4v2+s2"
    env.close()


def test_rollout_records_one_action_per_layer_group(tiny_model):
    env = make_env(tiny_model, bits=(2, (4, 2), 8), layer_groups=2)
    policy = make_policy("fixed:k4v2", env=env)
    assert policy.layer_groups == 2
    episode = rollout(env, policy, options={"row": env.pool[0].row})
    assert episode.actions == [[1, 1]] * len(episode)
    assert episode.final_info["avg_bits"] == 3 and episode.infos[0]["key_bits"] == [4, 4]
    env.close()
