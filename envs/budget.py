"""Budgeted control: the episode's average bits can never exceed ``bit_budget`` (HAQ-style).

The budget's unit is the one the issue defines: the *average bits* of an episode is the
token-weighted mean, over every prompt token, of the nominal bits it is stored at: a token of a
block committed at setting s counts ``mean_bits(s) = (key_bits + value_bits) / 2`` (K4V2 is 3), a
sink token (one of the sequence's first ``sink_tokens``) counts 16 whatever its block's setting.
Scales and zero-points are in the bytes (``kv_bytes``), not in the bits. Every term is a multiple
of 1/2 times a token count, so the sums below are exact in float64 and ``sum / tokens <= budget``
is decided without a tolerance (the cache's ``average_bits()`` divides the same exact sum).

Why masks *and* enforcement (HAQ, arXiv 1811.08886): a policy that can see the mask
(sb3-contrib's MaskablePPO, or any policy through :func:`masked_actions`) never asks for an
infeasible setting; one that cannot (a random action, an env checker, a plain PPO) is pushed back
under the budget by the env with :func:`fallback_action`, and ``info`` says so. A setting is
feasible when, committed for the pending block, the budget stays reachable with the cheapest
setting for every later block; the cheapest setting is therefore always feasible once the prompt
itself can meet the budget (checked at reset by :func:`check_reachable`), so a mask is never all
False.

This module is pure (numbers in, numbers out): the env (``envs.kv_precision``), the batched vector
env and every policy (``agents.base``) share it, so they fall back the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from envs.settings import FULL_BITS, Setting, mean_bits, setting_name, settings_by_cost

__all__ = [
    "FULL_BITS",
    "block_bit_sum",
    "check_budget",
    "check_reachable",
    "fallback_action",
    "feasible_mask",
    "masked_actions",
    "min_average_bits",
    "plan_fits",
    "protect_allowance",
    "sink_count",
]



def check_budget(budget: Any, menu: Sequence[Setting], layer_groups: int = 1) -> None:
    """ValueError unless ``budget`` is None or a positive finite number that the menu's cheapest setting
    meets; and unless ``layer_groups`` is 1 when a budget is set.

    Why no layer groups: sb3-contrib masks a ``MultiDiscrete`` action per dimension (a product of one
    mask per group), while the budget bounds the *sum* over groups; no product set equals the feasible
    set (e.g. two groups at 4+2 and 2+4 fit 3 bits, 4+4 does not), so a mask would either let
    over-budget actions through or forbid feasible ones. Refusing is clearer than a wrong mask.
    """
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"bit_budget must be a positive number of average bits (e.g. 3.0) or None, got {budget!r}")
    cheapest = menu[settings_by_cost(menu)[0]]
    if mean_bits(cheapest) > budget:
        raise ValueError(
            f"bit_budget={budget} is below the cheapest setting of the menu ({setting_name(cheapest)}: "
            f"{mean_bits(cheapest):g} average bits); no episode can meet it: raise the budget or add a cheaper setting"
        )
    if layer_groups != 1:
        raise ValueError(
            f"bit_budget cannot be combined with layer_groups={layer_groups}: per-group action masks "
            "(sb3-contrib's MultiDiscrete convention) cannot express a budget on the sum over groups; "
            "set layer_groups: 1 or bit_budget: null"
        )


def sink_count(start: int, end: int, sink_tokens: int) -> int:
    """How many of the positions ``[start, end)`` are among the sequence's first ``sink_tokens``."""
    return max(0, min(end, sink_tokens) - start)


def block_bit_sum(
    setting: Setting, start: int, end: int, sink_tokens: int, protected: int = 0, protect_setting: Setting = FULL_BITS
) -> float:
    """Nominal bits of the tokens ``[start, end)`` committed at ``setting`` (sink tokens at 16), of which
    ``protected`` tokens (none of them sinks) are kept at ``protect_setting`` instead (the env's per-token choice)."""
    sinks = sink_count(start, end, sink_tokens)
    if not 0 <= protected <= end - start - sinks:
        raise ValueError(f"protected must be in [0, {end - start - sinks}] (the block's non-sink tokens), got {protected}")
    return FULL_BITS * sinks + mean_bits(setting) * (end - start - sinks - protected) + mean_bits(protect_setting) * protected


def protect_allowance(
    menu: Sequence[Setting],
    budget: float,
    setting: Setting,
    protect_setting: Setting,
    committed_tokens: int,
    committed_bit_sum: float,
    pending_tokens: int,
    tokens_left: int,
    sink_tokens: int,
) -> int:
    """How many of the pending block's non-sink tokens may be kept at ``protect_setting`` when the block is
    committed at ``setting``, so that the budget stays reachable with the cheapest setting (and nothing
    protected) for every later block: the per-token counterpart of :func:`feasible_mask`.

    Every non-sink token when protection costs no more than the setting. ``setting`` itself must be
    feasible (the env asks after :func:`fallback_action`); the answer is then >= 0."""
    start, end = committed_tokens, committed_tokens + pending_tokens
    plain = pending_tokens - sink_count(start, end, sink_tokens)
    extra = mean_bits(protect_setting) - mean_bits(setting)
    if extra <= 0:
        return plain
    total = end + tokens_left
    cheapest = menu[settings_by_cost(menu)[0]]
    spent = committed_bit_sum + block_bit_sum(setting, start, end, sink_tokens) + block_bit_sum(
        cheapest, end, total, sink_tokens
    )
    spare = budget * total - spent  # every term a multiple of 1/2: exact
    return max(0, min(plain, math.floor(spare / extra)))


def min_average_bits(menu: Sequence[Setting], prompt_tokens: int, sink_tokens: int) -> float:
    """The lowest average bits a prompt of ``prompt_tokens`` tokens can reach: the cheapest setting everywhere."""
    if prompt_tokens <= 0:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    cheapest = menu[settings_by_cost(menu)[0]]
    return block_bit_sum(cheapest, 0, prompt_tokens, sink_tokens) / prompt_tokens


def check_reachable(budget: float, menu: Sequence[Setting], prompt_tokens: int, sink_tokens: int, what: str) -> None:
    """ValueError when even the cheapest setting everywhere cannot meet ``budget`` on this prompt (its
    sink tokens at 16 bits can lift a short prompt's average above it); ``what`` names the prompt."""
    lowest = min_average_bits(menu, prompt_tokens, sink_tokens)
    if lowest > budget:
        raise ValueError(
            f"{what}: bit_budget={budget} cannot be met; the minimum reachable average is {lowest:.4f} bits "
            f"({prompt_tokens} prompt tokens, {min(sink_tokens, prompt_tokens)} sink tokens at 16 bits, the "
            "rest at the cheapest setting); raise the budget or lower sink_tokens"
        )


def feasible_mask(
    menu: Sequence[Setting],
    budget: float,
    committed_tokens: int,
    committed_bit_sum: float,
    pending_tokens: int,
    tokens_left: int,
    sink_tokens: int,
) -> np.ndarray:
    """Bool mask over ``menu``: True where committing the pending block at that setting keeps the
    budget reachable with the cheapest setting for every later block.

    The pending block holds positions ``[committed_tokens, committed_tokens + pending_tokens)``, and
    ``tokens_left`` tokens come after it; ``committed_bit_sum`` is :func:`block_bit_sum` summed over
    the committed blocks. The episode's total is ``committed_tokens + pending_tokens + tokens_left``.
    """
    start, end = committed_tokens, committed_tokens + pending_tokens
    total = end + tokens_left
    cheapest = menu[settings_by_cost(menu)[0]]
    rest = committed_bit_sum + block_bit_sum(cheapest, end, total, sink_tokens)
    return np.array(
        [(rest + block_bit_sum(s, start, end, sink_tokens)) / total <= budget for s in menu], dtype=bool
    )


def fallback_action(menu: Sequence[Setting], action: int, mask: np.ndarray) -> int:
    """``action`` if the mask allows it, else the most precise allowed setting cheaper than it (order:
    :func:`envs.settings.settings_by_cost`), else (no cheaper one allowed) the cheapest allowed one.

    The env's masks are monotone in cost, so its fallback is always the dearest feasible setting below
    the request; the last branch only serves arbitrary masks. An all-False mask is an error.
    """
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    if mask.shape != (len(menu),):
        raise ValueError(f"mask has {mask.size} entries for a menu of {len(menu)} settings")
    action = int(action)
    if mask[action]:
        return action
    order = settings_by_cost(menu)
    position = order.index(action)
    for i in reversed(order[:position]):
        if mask[i]:
            return i
    for i in order[position + 1 :]:
        if mask[i]:
            return i
    raise ValueError(f"the action mask allows no setting of {[setting_name(s) for s in menu]}")


def masked_actions(menu: Sequence[Setting], actions: Any, masks: Any) -> np.ndarray:
    """:func:`fallback_action` over a policy's output: one action (0-d), a batch ``[n]``, or per layer
    group (``[groups]`` or ``[n, groups]``) with masks in sb3-contrib's layout: ``[len(menu)]`` or
    ``[n, len(menu)]`` per row, groups' masks concatenated (``[groups * len(menu)]``)."""
    acts = np.asarray(actions, dtype=np.int64)
    n_menu = len(menu)
    masks = np.asarray(masks, dtype=bool)
    if acts.ndim == 2:  # a batch, one action per layer group
        rows_acts = acts
    elif acts.ndim == 1 and masks.ndim == 2:  # a batch, one action each
        rows_acts = acts[:, None]
    else:  # one observation: one action, or one per layer group (the same slicing either way)
        rows_acts = acts.reshape(1, -1)
    if masks.size % max(len(rows_acts), 1):
        raise ValueError(f"action_masks of shape {masks.shape} do not fit actions of shape {acts.shape}")
    rows_masks = masks.reshape(len(rows_acts), -1)
    groups = rows_acts.shape[1]
    if rows_masks.shape[1] != groups * n_menu:
        raise ValueError(
            f"action_masks of shape {np.shape(masks)} do not fit actions of shape {acts.shape} over a menu of "
            f"{n_menu} settings (expected {groups * n_menu} mask entries per row)"
        )
    out = np.array(
        [
            [fallback_action(menu, a, m[g * n_menu : (g + 1) * n_menu]) for g, a in enumerate(row)]
            for row, m in zip(rows_acts, rows_masks, strict=True)
        ],
        dtype=np.int64,
    )
    return out.reshape(acts.shape)


def plan_fits(
    menu: Sequence[Setting], budget: float | None, blocks: Sequence[tuple[int, int]], plan: Sequence[int],
    sink_tokens: int,
) -> bool:
    """Whether committing ``plan[i]`` (menu indices) for block ``i`` keeps every step feasible under the
    env's mask (``feasible_mask``, the ledger kept as the env keeps it), i.e. the replay is
    never pushed back and ends within ``budget``. Always True without a budget."""
    if budget is None:
        return True
    total = blocks[-1][1]
    committed = 0.0
    for (start, end), index in zip(blocks, plan, strict=True):
        mask = feasible_mask(menu, budget, start, committed, end - start, total - end, sink_tokens)
        if not mask[index]:
            return False
        committed += block_bit_sum(menu[index], start, end, sink_tokens)
    return True
