"""The ``baseline_improvement`` reward and the env's baseline pass, on the tiny model.

The baseline itself scores exactly 0 (it runs the fixed policy's blocks, cache and scoring); any
other fixed setting scores its delta minus the baseline's; the pass is computed once per prompt,
stored with the references and reloaded by a fresh env, never served to another setting or config;
bad parameters fail clearly; the batched vector env gets the same baseline.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from _tiny_env import ITEMS, TINY_CONFIG, make_env

import envs
from envs.kv_precision import KVPrecisionEnv
from envs.rewards import RewardFunction
from envs.settings import normalize_setting

MENU = (2, (4, 2), 4, 16)
ROWS = [ITEMS[0].row, ITEMS[3].row, ITEMS[6].row]


def baseline_rewards(baseline: str, weight: float = 1.0) -> dict:
    return {"baseline_improvement": {"weight": weight, "baseline": baseline}}


def run_fixed(env: KVPrecisionEnv, action, row: int) -> tuple[list[float], dict]:
    """One episode of ``row`` at a fixed action: the rewards of every step and the terminal info."""
    env.reset(options={"row": row})
    rewards = []
    while True:
        _, reward, terminated, _, info = env.step(action)
        rewards.append(reward)
        if terminated:
            return rewards, info


@pytest.fixture
def counted(monkeypatch):
    """Counts baseline passes computed in this process: (setting, prompt length) per call."""
    calls = []
    original = KVPrecisionEnv._compute_baseline

    def compute(self, setting, prompt_ids, *args):
        calls.append((setting, len(prompt_ids)))
        return original(self, setting, prompt_ids, *args)

    monkeypatch.setattr(KVPrecisionEnv, "_compute_baseline", compute)
    return calls


@pytest.mark.parametrize(
    "baseline,overrides",
    [
        ("k4v2", {}),
        ("k4v2", {"sink_tokens": 4}),
        ("2", {"sink_tokens": 3}),
        ("2", {"layer_groups": 2}),  # every group at the setting: the one-group commit
        ("4", {"cache": "quanto", "bits": (4,)}),
        ("2", {"sink_tokens": 3, "rotate_keys": True}),
    ],
    ids=["k4v2", "k4v2+s4", "2+s3", "2-groups", "quanto4", "2+s3-rotated"],
)
def test_the_baseline_itself_scores_exactly_zero(tiny_model, baseline, overrides):
    env = make_env(tiny_model, **{"bits": MENU, **overrides}, rewards=baseline_rewards(baseline))
    index = env.bits.index(normalize_setting(baseline))
    action = index if env.layer_groups == 1 else [index] * env.layer_groups
    for row in ROWS:
        rewards, info = run_fixed(env, action, row)
        assert len(rewards) > 2 and all(r == 0.0 for r in rewards)
        assert info["rewards"]["baseline_improvement"] == 0.0
        assert info["loglik_delta"] != 0.0  # the setting does damage: 0 is not trivially reached
        assert np.array_equal(env.baseline_scores(baseline), np.asarray(info["scores"]))


def test_another_setting_scores_its_delta_minus_the_baselines(tiny_model):
    env = make_env(tiny_model, bits=MENU, rewards={**baseline_rewards("k4v2", weight=2.0), "ending_loglik": 1.0})
    plain = make_env(tiny_model, bits=MENU)
    for row in ROWS[:2]:
        _, base = run_fixed(plain, MENU.index((4, 2)), row)
        rewards, info = run_fixed(env, MENU.index(2), row)
        term = info["rewards"]["baseline_improvement"]
        assert term == info["loglik_delta"] - base["loglik_delta"]
        assert term != 0.0
        assert rewards[-1] == pytest.approx(2.0 * term + info["loglik_delta"], abs=1e-12)
        assert all(r == 0.0 for r in rewards[:-1])  # terminal only


def test_baseline_is_computed_once_per_prompt_and_reloaded_from_the_store(tiny_model, tmp_path, counted):
    env = make_env(tiny_model, bits=MENU, rewards=baseline_rewards("k4v2"), reference_store=str(tmp_path))
    first = [run_fixed(env, 0, row)[1] for row in (ROWS[0], ROWS[0], ROWS[1])]
    assert len(counted) == 2  # rows 0 and 1, once each
    env.reset(options={"row": ROWS[1]})
    env.baseline_scores("k4v2")
    env.baseline_scores((4, 2))  # the same setting spelt as a pair
    assert len(counted) == 2
    # one entry per reference and per baseline; the baselines' keys name their variant
    metas = []
    for path in tmp_path.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metas.append(json.loads(f.metadata()["key"]))
    assert sorted(m.get("variant", "") for m in metas) == ["", ""] + [env._baseline_variant((4, 2))] * 2

    fresh = make_env(tiny_model, bits=MENU, rewards=baseline_rewards("k4v2"), reference_store=str(tmp_path))
    again = [run_fixed(fresh, 0, row)[1] for row in (ROWS[0], ROWS[1])]
    assert len(counted) == 2  # loaded from disk, not recomputed
    assert again[0] == first[0] and again[1] == first[2]


@pytest.mark.parametrize(
    "overrides,baseline",
    [
        ({}, "4"),
        ({}, "k2v4"),
        ({"sink_tokens": 4}, "k4v2"),
        ({"interval": 32}, "k4v2"),
        ({"group_size": 8}, "k4v2"),
        ({"rotate_keys": True}, "k4v2"),
        ({"rotate_values": True}, "k4v2"),
    ],
    ids=["setting", "swapped-halves", "sink_tokens", "interval", "group_size", "rotate_keys", "rotate_values"],
)
def test_a_baseline_stored_under_another_setting_or_config_is_not_reused(
    tiny_model, tmp_path, counted, overrides, baseline
):
    writer = make_env(tiny_model, bits=MENU, reference_store=str(tmp_path))
    writer.reset(options={"row": ROWS[0]})
    stored = writer.baseline_scores("k4v2")
    assert len(counted) == 1
    other = make_env(tiny_model, **{"bits": MENU, **overrides}, reference_store=str(tmp_path))
    other.reset(options={"row": ROWS[0]})
    scores = other.baseline_scores(baseline)
    assert len(counted) == 2  # computed, not read from the k4v2 entry
    assert not np.array_equal(scores, stored)
    # in one process: a sibling shares the writer's memory, which must not serve k4v2 either
    sibling = writer.sibling(**overrides)
    sibling.reset(options={"row": ROWS[0]})
    assert np.array_equal(sibling.baseline_scores(baseline), scores)
    assert len(counted) == 2  # read from the entry ``other`` stored


def test_layer_groups_reuse_the_one_group_baseline(tiny_model, tmp_path, counted):
    """Every group at the setting is the one-group commit, so the entry is shared, and exact."""
    writer = make_env(tiny_model, bits=MENU, reference_store=str(tmp_path))
    writer.reset(options={"row": ROWS[0]})
    writer.baseline_scores("k4v2")
    grouped = make_env(tiny_model, bits=MENU, layer_groups=2, rewards=baseline_rewards("k4v2"),
                       reference_store=str(tmp_path))
    _, info = run_fixed(grouped, [1, 1], ROWS[0])
    assert len(counted) == 1 and info["rewards"]["baseline_improvement"] == 0.0


def test_all_endings_compares_the_mean_of_every_ending(tiny_model):
    """``endings: all``: 0 for the baseline itself, else the mean ending score minus the baseline's (gold-blind)."""
    rewards = {"baseline_improvement": {"baseline": "k4v2", "endings": "all"}}
    env = make_env(tiny_model, bits=MENU, rewards=rewards)
    gold = make_env(tiny_model, bits=MENU, rewards=baseline_rewards("k4v2"))
    for row in ROWS[:2]:
        steps, info = run_fixed(env, MENU.index((4, 2)), row)
        assert all(r == 0.0 for r in steps) and info["rewards"]["baseline_improvement"] == 0.0
        steps, info = run_fixed(env, MENU.index(2), row)
        expected = np.mean(info["scores"]) - np.mean(env.baseline_scores("k4v2"))
        assert steps[-1] == info["rewards"]["baseline_improvement"] == pytest.approx(expected, abs=1e-12)
        assert all(r == 0.0 for r in steps[:-1]) and steps[-1] != 0.0
        _, gold_info = run_fixed(gold, MENU.index(2), row)
        assert gold_info["rewards"]["baseline_improvement"] != pytest.approx(steps[-1])  # another signal


@pytest.mark.parametrize(
    "params,match",
    [
        ({"baseline": "k4v2", "endings": "gold-ish"}, "endings must be one of"),
        ({}, "needs the fixed setting to measure against"),
        ({"baseline": None}, "needs the fixed setting"),
        ({"baseline": "fast"}, "'fast' is not a setting"),
        ({"baseline": "k5v2"}, "'k5v2' is not a setting"),
        ({"baseline": 5}, "5 is not a setting"),
        ({"baseline": [4, 2, 1]}, "is not a setting"),
    ],
)
def test_bad_baseline_parameters_fail_clearly(params, match):
    with pytest.raises(ValueError, match=match):
        RewardFunction({"baseline_improvement": {"weight": 1.0, **params}})


def test_baseline_the_cache_cannot_hold_or_before_reset_fails_clearly(tiny_model):
    env = make_env(tiny_model, bits=MENU)
    with pytest.raises(RuntimeError, match="before reset"):
        env.baseline_scores("4")
    quanto = make_env(tiny_model, cache="quanto", bits=(4,), rewards=baseline_rewards("k4v2"))
    quanto.reset(options={"row": ROWS[0]})
    with pytest.raises(ValueError, match="cache='mixed'"):
        quanto.baseline_scores("k4v2")
    with pytest.raises(ValueError, match="cache='mixed'"):
        run_fixed(quanto, 0, ROWS[0])
    env.reset(options={"row": ROWS[0]})
    with pytest.raises(ValueError, match="cannot read setting"):
        env.baseline_scores("fast")


@pytest.mark.parametrize("endings", ["gold", "all"])
def test_vector_env_rewards_against_the_single_envs_baseline(tiny_model, tmp_path, counted, endings):
    """Rows read the unbatched baseline pass (shared, once per prompt): the reward is the row's own
    delta minus exactly the single env's baseline delta (the row's delta has the batched forward's noise)."""
    model, tok = tiny_model
    rewards = {"baseline_improvement": {"baseline": "k4v2", "endings": endings}}
    vec = gym.make_vec(
        envs.ENV_ID, num_envs=3, vectorization_mode="vector_entry_point", lm=model, tokenizer=tok, items=ITEMS,
        **{**TINY_CONFIG, "bits": MENU, "rewards": rewards, "reference_store": str(tmp_path)},
    )
    single = make_env(tiny_model, bits=MENU, reference_store=str(tmp_path))
    vec.reset(options={"rows": ROWS})
    ends: dict[int, tuple[float, dict]] = {}
    while len(ends) < len(ROWS):
        _, reward, terminated, _, info = vec.step(np.full(3, MENU.index((4, 2))))
        for i in np.flatnonzero(terminated):
            ends.setdefault(int(i), (float(reward[i]), {k: info[k][i] for k in ("row", "loglik_delta", "gold", "scores")}))
    assert len(counted) == len(ROWS)  # one pass per prompt
    for reward, info in ends.values():
        single.reset(options={"row": info["row"]})
        gold = info["gold"]
        if endings == "all":
            assert reward == pytest.approx(np.mean(info["scores"]) - np.mean(single.baseline_scores("k4v2")), abs=1e-9)
        else:
            base_delta = single.baseline_scores("k4v2")[gold] - single.reference_for(info["row"]).ending_scores[gold]
            assert reward == info["loglik_delta"] - base_delta
        assert abs(reward) < 1.0  # the baseline policy itself: 0 up to the batched forward's noise
    assert len(counted) == len(ROWS)  # the single env read the stored passes
    vec.close()
