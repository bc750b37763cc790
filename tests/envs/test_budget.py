"""Budgeted control (envs.budget, EnvConfig.bit_budget) on the tiny model.

The pure accounting and fallback first (hand-computed numbers), then the env: a random *masked*
policy never ends over budget and is never pushed back (property test over seeds), an unmasked one
is pushed back under it with ``info`` saying so, the masks are tight (a policy taking the dearest
allowed setting ends close to the budget), the env checkers pass, bad budgets fail clearly, and the
batched vector env's masks equal the single env's row for row.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from _tiny_env import ITEMS, TINY_CONFIG, make_env

import envs
from envs.budget import (
    block_bit_sum,
    check_budget,
    fallback_action,
    feasible_mask,
    masked_actions,
    min_average_bits,
    sink_count,
)
from envs.kv_precision import EnvConfig
from envs.settings import mean_bits, setting_name

MENU = (2, (4, 2), 4, 8, 16)  # mean bits 2, 3, 4, 8, 16
BUDGET = 3.0
SEEDS = range(48)


# --- the pure accounting ----------------------------------------------------------------------
def test_block_bit_sum_counts_sink_tokens_at_16():
    assert sink_count(0, 16, 4) == 4 and sink_count(16, 32, 4) == 0 and sink_count(2, 8, 4) == 2
    assert block_bit_sum((4, 2), 0, 16, 0) == 16 * 3
    assert block_bit_sum((4, 2), 0, 16, 4) == 4 * 16 + 12 * 3
    assert block_bit_sum(2, 16, 32, 4) == 16 * 2
    assert min_average_bits(MENU, 64, 4) == (4 * 16 + 60 * 2) / 64


def test_feasible_mask_keeps_the_budget_reachable_with_the_cheapest_setting_after():
    # 64 tokens, budget 3 -> 192 bits. Block 0 (16 tokens) pending, 48 left at >= 2 bits (96 bits):
    # the block may take 96 bits, i.e. up to 6 bits per token -> 2, k4v2, 4 allowed; 8, 16 not.
    mask = feasible_mask(MENU, 3.0, 0, 0.0, 16, 48, 0)
    assert mask.tolist() == [True, True, True, False, False]
    # with 4 sink tokens in the pending block: 64 of its bits are fixed; 12 tokens share 32 bits -> <= 2.67
    assert feasible_mask(MENU, 3.0, 0, 0.0, 16, 48, 4).tolist() == [True, False, False, False, False]
    # the last block after 48 tokens at 3 bits (144 bits) may take 48 bits: an exact fit (k4v2) is allowed
    assert feasible_mask(MENU, 3.0, 48, 144.0, 16, 0, 0).tolist() == [True, True, False, False, False]


def test_fallback_is_the_most_precise_allowed_setting_below_the_request():
    menu = (16, 2, (2, 4), (4, 2), 8)  # not sorted; k4v2 counts as cheaper than k2v4 at equal mean bits
    mask = np.array([False, True, True, True, False])
    assert fallback_action(menu, 0, mask) == 2  # 16 -> k2v4 (dearest allowed below it)
    assert fallback_action(menu, 4, mask) == 2
    assert fallback_action(menu, 3, mask) == 3  # allowed: unchanged
    assert fallback_action(menu, 1, np.array([True, False, False, False, False])) == 0  # nothing cheaper
    with pytest.raises(ValueError, match="allows no setting"):
        fallback_action(menu, 0, np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match="5 settings"):
        fallback_action(menu, 0, np.ones(3, dtype=bool))


def test_masked_actions_follow_sb3_contrib_layouts():
    menu = (2, 4, 8)
    row = np.array([True, True, False])
    assert masked_actions(menu, np.int64(2), row).item() == 1  # one observation
    assert masked_actions(menu, [2, 0], np.stack([row, row])).tolist() == [1, 0]  # a batch
    groups = np.concatenate([row, [True, False, False]])  # two layer groups, masks concatenated
    assert masked_actions(menu, [2, 2], groups).tolist() == [1, 0]
    assert masked_actions(menu, [[2, 2]], groups[None]).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="do not fit"):
        masked_actions(menu, [2, 2], np.ones(4, dtype=bool))


@pytest.mark.parametrize(
    "budget, groups, match",
    [
        (0, 1, "positive number"),
        (-1.0, 1, "positive number"),
        (True, 1, "positive number"),
        ("3", 1, "positive number"),
        (float("nan"), 1, "positive number"),
        (1.5, 1, r"below the cheapest setting of the menu \(2: 2 average bits\)"),
        (3.0, 2, "layer_groups=2"),
    ],
)
def test_bad_budgets_are_clear_errors(budget, groups, match):
    with pytest.raises(ValueError, match=match):
        check_budget(budget, MENU, groups)
    with pytest.raises(ValueError, match=match):
        EnvConfig(bits=MENU, bit_budget=budget, layer_groups=groups, device="cpu").validate()


def test_config_accepts_none_and_numbers():
    check_budget(None, MENU, 4)
    EnvConfig(bits=MENU, bit_budget=2, device="cpu").validate()
    assert EnvConfig.from_dict({"bit_budget": 2.5}).bit_budget == 2.5


def test_a_prompt_the_budget_cannot_fit_is_an_error_at_reset(tiny_model):
    env = make_env(tiny_model, bits=(2, 16), bit_budget=2.5, sink_tokens=40)
    with pytest.raises(ValueError, match=r"row \d+: bit_budget=2.5 cannot be met; the minimum reachable average is"):
        env.reset(seed=0)


# --- the env ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[0, 3], ids=["no-sinks", "3-sinks"])
def env(request, tiny_model):
    e = make_env(tiny_model, bits=MENU, bit_budget=BUDGET, sink_tokens=request.param)
    yield e
    e.close()


def _ledger_average(infos: list[dict], sinks: int, blocks: list[tuple[int, int]]) -> float:
    """The issue's average bits from the settings the env reports (independent of the cache)."""
    total = sum(
        16 * max(0, min(end, sinks) - start) + mean_bits(i["bits"]) * (end - start - max(0, min(end, sinks) - start))
        for i, (start, end) in zip(infos, blocks, strict=True)
    )
    return total / blocks[-1][1]


def _blocks(reset_info: dict, interval: int) -> list[tuple[int, int]]:
    n = reset_info["prompt_tokens"]
    return [(s, min(s + interval, n)) for s in range(0, n, interval)]


def test_random_masked_policy_never_ends_over_budget(env):
    rng = np.random.default_rng(0)
    for seed in SEEDS:
        _, reset_info = env.reset(seed=seed)
        infos, done = [], False
        while not done:
            mask = env.action_masks()
            assert mask.dtype == bool and mask.shape == (len(MENU),) and mask[0]  # the cheapest is always allowed
            _, _, done, _, info = env.step(int(rng.choice(np.flatnonzero(mask))))
            assert not info["budget_enforced"] and info["requested_setting"] == info["setting"]
            infos.append(info)
        assert info["avg_bits"] <= BUDGET, (seed, info["avg_bits"])
        ledger = _ledger_average(infos, env.config.sink_tokens, _blocks(reset_info, env.config.interval))
        assert ledger == pytest.approx(info["avg_bits"], abs=1e-12) and ledger <= BUDGET
        assert env.action_masks().all()  # after the end: nothing to mask


def test_unmasked_random_policy_is_pushed_back_under_the_budget(env):
    rng = np.random.default_rng(1)
    enforced = 0
    for seed in SEEDS:
        env.reset(seed=seed)
        done = False
        while not done:
            mask = env.action_masks()
            action = int(rng.integers(len(MENU)))
            _, _, done, _, info = env.step(action)
            expected = fallback_action(env.bits, action, mask)
            assert info["bits"] == env.bits[expected]
            assert info["requested_setting"] == setting_name(env.bits[action])
            assert info["budget_enforced"] == (expected != action)
            enforced += info["budget_enforced"]
        assert info["avg_bits"] <= BUDGET, (seed, info["avg_bits"])
    assert enforced > 0  # random actions do go over: the enforcement was exercised


def test_masks_are_tight_the_dearest_allowed_setting_spends_the_budget(tiny_model):
    env = make_env(tiny_model, bits=MENU, bit_budget=BUDGET)
    by_cost = sorted(MENU, key=mean_bits)
    for seed in range(6):
        _, reset_info = env.reset(seed=seed)
        done = False
        while not done:
            _, _, done, _, info = env.step(len(MENU) - 1)  # always ask for 16: the env gives the dearest allowed
        # the slack left is less than what lifting the last block one setting up would cost
        start, end = _blocks(reset_info, env.config.interval)[-1]
        last = by_cost.index(info["bits"])
        assert info["budget_enforced"] and last < len(MENU) - 1
        step_up = (mean_bits(by_cost[last + 1]) - mean_bits(by_cost[last])) * (end - start)
        slack = (BUDGET - info["avg_bits"]) * reset_info["prompt_tokens"]
        assert 0 <= slack < step_up


def test_no_budget_means_all_true_masks_and_no_enforcement(tiny_model):
    env = make_env(tiny_model, bits=MENU)
    assert env.action_masks().all() and env.action_masks().shape == (len(MENU),)
    env.reset(seed=0)
    _, _, _, _, info = env.step(len(MENU) - 1)
    assert env.action_masks().all() and info["budget_enforced"] is False and info["requested_setting"] == "16"


def test_both_checkers_pass_with_a_budget(env):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_vector_env_masks_equal_the_single_envs_row_for_row(tiny_model):
    model, tok = tiny_model
    vec = gym.make_vec(
        envs.ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", lm=model, tokenizer=tok, items=ITEMS,
        **{**TINY_CONFIG, "bits": MENU, "bit_budget": BUDGET, "sink_tokens": 2},
    )
    single = make_env(tiny_model, bits=MENU, bit_budget=BUDGET, sink_tokens=2)
    rows = [vec.unwrapped.envs[0].items[0].row, vec.unwrapped.envs[0].items[1].row]
    vec.reset(options={"rows": rows})
    singles = [single.sibling() for _ in rows]
    for s, row in zip(singles, rows, strict=True):
        s.reset(options={"row": row})
    rng = np.random.default_rng(0)
    ended = np.zeros(2, dtype=bool)
    compared = 0
    while not ended.all():
        masks = vec.action_masks()
        assert masks.shape == (2, len(MENU)) and masks.dtype == bool
        actions = rng.integers(len(MENU), size=2)
        for i, s in enumerate(singles):
            if not ended[i]:
                assert np.array_equal(masks[i], s.action_masks())
                compared += 1
        _, _, term, _, infos = vec.step(actions)
        for i, s in enumerate(singles):
            if not ended[i]:
                _, _, done, _, info = s.step(int(actions[i]))
                assert infos["setting"][i] == info["setting"]
                assert bool(infos["budget_enforced"][i]) == info["budget_enforced"]
                if done:
                    assert info["avg_bits"] <= BUDGET and infos["avg_bits"][i] == info["avg_bits"]
                    ended[i] = True
    assert compared >= 4
    vec.close()
