"""experiments.train_selector end to end on the tiny random Llama over small pass-key prompts: the files
it writes, what they say against the env's own evidence, the policy loading from them, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from agents.registry import make_policy
from agents.token_select import TokenSelector, TokenSelectPolicy
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments import train_selector

pytestmark = pytest.mark.usefixtures("quiet_one_thread")

TOKEN_FEATURES = ["digits", "capital", "word_start", "punct", "token_rank"]
ITEMS, CHECK_ITEMS = 4, 2


def _sets(hellaswag_path, out_dir, **extra) -> dict[str, str]:
    return {
        "env.model": "tiny-random-llama", "env.task": "passkey", "env.task_options": "{length: 600, items: 12}",
        "env.data_path": str(hellaswag_path), "env.split": "train", "env.eval_size": "4", "env.interval": "64",
        "env.group_size": "32", "env.bits": "[2, 4]", "env.sink_tokens": "4", "env.protect_bits": "4",
        "env.features": "[digits, blocks_left]", "env.token_features": "[" + ", ".join(TOKEN_FEATURES) + "]",
        "items": str(ITEMS), "check_items": str(CHECK_ITEMS), "window": "4", "setting": "2", "tail_tokens": "8", "progress": "false",
        "out_dir": str(out_dir), **extra,
    }


def _argv(sets: dict[str, str]) -> list[str]:
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hellaswag_path):
    out = tmp_path_factory.mktemp("train_selector")
    paths = train_selector.main(_argv(_sets(hellaswag_path, out)))
    return out, paths


def test_writes_selector_fit_and_config(trained):
    out, paths = trained
    assert paths["selector"] == out / "selector.json" and paths["fit"] == out / "fit.json"
    assert all(p.is_file() for p in paths.values())
    selector = TokenSelector.load(paths["selector"])
    assert selector.features == TOKEN_FEATURES and selector.window == 4 and selector.setting == "2"
    assert selector.tail_tokens == 8  # stored as configured, not fitted
    assert len(selector.weights) == 2 * len(TOKEN_FEATURES)
    fit = json.loads(paths["fit"].read_text())
    assert len(fit["fit_rows"]) == ITEMS and len(fit["check_rows"]) == CHECK_ITEMS
    assert not set(fit["fit_rows"]) & set(fit["check_rows"])
    assert list(fit["weights"]) == TOKEN_FEATURES + [f"{f}_near" for f in TOKEN_FEATURES]
    assert list(fit["weights"].values()) == pytest.approx(selector.weights)
    for part in ("fit", "check"):
        assert 0 <= fit[part]["precision"] <= 1 and 0 <= fit[part]["recall"] <= 1
        assert selector.info[part] == pytest.approx(fit[part])
    config = yaml.safe_load(paths["config"].read_text())
    assert config["items"] == ITEMS and config["env"]["protect_bits"] == 4


def test_fit_report_agrees_with_the_envs_evidence(trained):
    _, paths = trained
    fit = json.loads(paths["fit"].read_text())
    env = KVPrecisionEnv(EnvConfig.from_dict(yaml.safe_load(paths["config"].read_text())["env"]))
    pool_rows = {item.row for item in env.pool}
    rows = fit["fit_rows"] + fit["check_rows"]
    assert set(rows) <= pool_rows  # held-out items are never fitted on
    assert rows == [item.row for item in env.items[: ITEMS + CHECK_ITEMS]]  # the train split's order
    evidence = []
    for row in fit["fit_rows"]:
        env.reset(options={"row": row})
        evidence.append(sum(env.evidence_tokens()))
    env.close()
    assert fit["fit"]["evidence_per_episode"] == pytest.approx(np.mean(evidence))
    # the threshold keeps at most keep_ratio (1) x the evidence tokens of the fitting rows
    assert 0 < fit["fit"]["marked_per_episode"] <= fit["fit"]["evidence_per_episode"] + 0.5 / ITEMS
    assert fit["fit"]["recall"] > 0


def test_the_selector_loads_as_a_policy_and_runs_on_held_out_items(trained):
    _, paths = trained
    env_cfg = yaml.safe_load(paths["config"].read_text())["env"]
    env = KVPrecisionEnv(EnvConfig.from_dict({**env_cfg, "split": "eval"}))
    policy = make_policy(f"select:{paths['selector']}", env=env)
    assert isinstance(policy, TokenSelectPolicy)
    obs, _ = env.reset(options={"row": env.items[0].row})
    done, marked = False, 0
    while not done:
        action, _ = policy.predict(obs, action_masks=env.action_masks())
        assert action.shape == (65,) and action[0] == env.bits.index(2)
        obs, _, done, _, info = env.step(action)
        marked += info["protected_tokens"]
    prompt_tokens = env.block_spans()[-1][1]
    assert marked > 0  # the marked tokens are at 4 bits instead of 2, sinks at 16
    assert info["avg_bits"] == pytest.approx((4 * 16 + 2 * (prompt_tokens - 4) + 2 * marked) / prompt_tokens)
    env.close()


@pytest.mark.parametrize(("extra", "message"), [
    ({"env.split": "eval"}, "env.split must be 'train'"),
    ({"env.protect_bits": "null"}, "needs an env with token_features .* and protect_bits"),
    ({"env.token_features": "[]"}, "needs an env with token_features"),
    ({"items": "0"}, "items must be >= 1"),
    ({"env.features": "[digits]"}, "tail_tokens needs blocks_left"),
])
def test_refusals_before_any_work(tmp_path, hellaswag_path, extra, message):
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=message):
        train_selector.main(_argv(_sets(hellaswag_path, out, **extra)))
    assert not out.exists()


@pytest.mark.parametrize(("extra", "message"), [
    ({"setting": "8"}, "not in the env's menu"),
    ({"items": "20"}, "the pool has 8 items; offset \\+ items \\+ check_items needs 22"),
    ({"offset": "3", "items": "4"}, "the pool has 8 items; offset \\+ items \\+ check_items needs 9"),
])
def test_refusals_once_the_env_is_built(tmp_path, hellaswag_path, extra, message):
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=message):
        train_selector.main(_argv(_sets(hellaswag_path, out, **extra)))
    assert not out.exists()
