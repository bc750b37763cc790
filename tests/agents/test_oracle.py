"""The per-item greedy oracle on the tiny model: deterministic, within budget, never worse than its completion."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envs"))
from _tiny_env import ITEMS, make_env  # noqa: E402

from agents.fixed import FixedBitsPolicy  # noqa: E402
from agents.oracle import OraclePolicy, _allowed, _candidates  # noqa: E402
from agents.registry import canonical_name, make_policy  # noqa: E402
from agents.rollout import Schedule, rollout  # noqa: E402
from envs.settings import parse_setting  # noqa: E402

MENU = (2, (4, 2), 4, 8)
BUDGET = 3.0
ROWS = (ITEMS[3].row, ITEMS[7].row)


@pytest.fixture(scope="module")
def env(tiny_model):
    e = make_env(tiny_model, bits=MENU)
    yield e
    e.close()


@pytest.mark.parametrize("row", ROWS)
def test_oracle_is_deterministic_within_budget_and_beats_its_completion(env, row):
    oracle = OraclePolicy(env.observation_names, env.bits, budget=BUDGET)
    assert env.bits[oracle.completion_index(BUDGET)] == (4, 2)  # the dearest setting within 3 bits
    plan = oracle.plan(env, row)
    value = oracle.last_value
    assert oracle.plan(env, row) == plan and oracle.last_value == value
    replay = rollout(env, Schedule(plan), options={"row": row}).final_info
    assert replay["loglik_delta"] == value  # the replay is the episode the oracle planned
    assert replay["avg_bits"] <= BUDGET + 1e-9
    fixed = rollout(env, FixedBitsPolicy(env.observation_names, env.bits, (4, 2)), options={"row": row}).final_info
    assert value >= fixed["loglik_delta"]


def test_oracle_with_an_explicit_completion_and_no_budget(env):
    oracle = make_policy("oracle:2", env=env)
    assert oracle.name == "oracle:2" and oracle.completion == 2
    row = ROWS[0]
    plan = oracle.plan(env, row)
    fixed = rollout(env, Schedule([0] * len(plan)), options={"row": row}).final_info
    assert oracle.last_value >= fixed["loglik_delta"]
    assert max(plan) > 0  # without a budget some block is worth more than 2 bits on a random model


def test_oracle_only_plans(env):
    oracle = make_policy("oracle", env=env)
    assert oracle.name == "oracle" and canonical_name("oracle:k4v4") == "oracle:4"
    with pytest.raises(TypeError, match="plans per item"):
        oracle.predict(np.zeros(len(env.observation_names), dtype=np.float32))
    with pytest.raises(ValueError, match="not in the env's menu"):
        make_policy("oracle:16", env=env)
    with pytest.raises(ValueError, match="ends over the budget"):
        OraclePolicy(env.observation_names, env.bits, completion=8, budget=BUDGET).plan(env, ROWS[0])


def test_candidates_and_masks():
    assert _candidates(MENU, 1) == [0, 1, 2, 3]
    pairs = _candidates((2, 4), 2)
    assert pairs[0] == [0, 0] and pairs[-1] == [1, 1] and len(pairs) == 4
    assert _allowed(np.array([True, False]), 0, 2) and not _allowed(np.array([True, False]), 1, 2)
    assert not _allowed(np.array([True, True, True, False]), [1, 1], 2)  # per-group masks, concatenated
    with pytest.raises(ValueError, match="combination"):
        _candidates(MENU, 5)


def test_oracle_with_layer_groups(tiny_model):
    env = make_env(tiny_model, bits=(2, 4), layer_groups=2)
    oracle = OraclePolicy(env.observation_names, env.bits, budget=3.0)
    plan = oracle.plan(env, ROWS[0])
    assert all(isinstance(a, list) and len(a) == 2 for a in plan)
    replay = rollout(env, Schedule(plan), options={"row": ROWS[0]}).final_info
    assert replay["loglik_delta"] == oracle.last_value and replay["avg_bits"] <= 3.0 + 1e-9
    env.close()


def test_oracle_completing_with_a_static_schedule_never_loses_to_it(env, tmp_path):
    """oracle:<schedule.json>: every branch finishes with the schedule's later actions, so the plan's value
    is at least the schedule's own episode on the item (its headroom over the search baseline)."""
    from agents.static import StaticSchedulePolicy

    schedule = StaticSchedulePolicy(env.observation_names, env.bits, ["k4v2", 2, 4], budget=BUDGET)
    path = schedule.save(tmp_path / "schedule.json")
    budgeted = env.sibling(bit_budget=BUDGET)
    try:
        oracle = make_policy(f"oracle:{path}", env=budgeted)
        assert oracle.name == "oracle:static" and canonical_name(f"oracle:{path}") == "oracle:static"
        for row in ROWS:
            plan = oracle.plan(budgeted, row)
            value = oracle.last_value
            replay = rollout(budgeted, Schedule(plan), options={"row": row}).final_info
            static = rollout(budgeted, schedule, options={"row": row}).final_info
            assert replay["loglik_delta"] == value and replay["avg_bits"] <= BUDGET + 1e-9
            assert value >= static["loglik_delta"]
            assert oracle.plan(budgeted, row) == plan  # deterministic
    finally:
        budgeted.close()
    with pytest.raises(ValueError, match="menu"):
        OraclePolicy(env.observation_names, env.bits,
                     completion=StaticSchedulePolicy(env.observation_names, (2, 4), [2]))


def test_blind_oracle_maximises_every_endings_log_lik_not_the_gold_one(env):
    """blind-oracle: the same search, valued by the mean log-lik of all endings (it never reads which is gold)."""
    row = ROWS[0]
    blind = make_policy("blind-oracle:k4v2", env=env)
    assert blind.name == "blind-oracle:k4v2" and blind.objective == "endings"
    assert canonical_name("blind-oracle") == "blind-oracle"
    plan = blind.plan(env, row)
    replay = rollout(env, Schedule(plan), options={"row": row}).final_info
    assert np.mean(replay["scores"]) == blind.last_value  # its value is the replay's mean ending score
    fixed = rollout(env, FixedBitsPolicy(env.observation_names, env.bits, (4, 2)), options={"row": row}).final_info
    assert blind.last_value >= np.mean(fixed["scores"])
    with pytest.raises(ValueError, match="objective"):
        OraclePolicy(env.observation_names, env.bits, objective="accuracy")


def test_return_oracle_maximises_the_envs_reward_prompt_only(env):
    """return-oracle: the same search valued by the env's own return from the block on; with the reward
    ``prompt_loglik`` it reads the prompt's own tokens only (the terminal step scores no prompt tokens)."""
    row = ROWS[0]
    prompt_env = env.sibling(rewards={"prompt_loglik": 1.0}, bit_budget=BUDGET)
    try:
        oracle = make_policy("return-oracle:k4v2", env=prompt_env)
        assert oracle.name == "return-oracle:k4v2" and oracle.objective == "return"
        assert canonical_name("return-oracle") == "return-oracle"
        plan = oracle.plan(prompt_env, row)
        assert oracle.plan(prompt_env, row) == plan  # deterministic
        replay = rollout(prompt_env, Schedule(plan), options={"row": row})
        assert replay.final_info["avg_bits"] <= BUDGET + 1e-9
        assert replay.final_info["rewards"]["prompt_loglik"] == 0.0  # the endings are not in its objective
        fixed = rollout(prompt_env, FixedBitsPolicy(env.observation_names, env.bits, (4, 2)), options={"row": row})
        assert sum(replay.rewards) == pytest.approx(oracle.last_value)  # its value is the replay's return
        assert oracle.last_value >= sum(fixed.rewards) - 1e-9
    finally:
        prompt_env.close()


def test_a_tie_keeps_the_completions_action(env):
    """Under ``prompt_loglik`` the last block's setting changes nothing the objective reads (no prompt token
    follows it): every candidate ties there, and the plan keeps the completion's setting, not the cheapest."""
    prompt_env = env.sibling(rewards={"prompt_loglik": 1.0})
    try:
        for completion in ("k4v2", "4"):
            plan = make_policy(f"return-oracle:{completion}", env=prompt_env).plan(prompt_env, ROWS[1])
            assert plan[-1] == env.bits.index(parse_setting(completion))
    finally:
        prompt_env.close()
