"""The budget's per-token accounting (envs.budget): ``block_bit_sum`` with protected tokens and
``protect_allowance``, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from envs.budget import block_bit_sum, feasible_mask, min_average_bits, protect_allowance

MENU = (2, 4)


def test_block_bit_sum_counts_protected_tokens_at_their_setting():
    # 4 sinks at 16, 10 protected at 4, the other 50 at 2
    assert block_bit_sum(2, 0, 64, 4, 10, 4) == 4 * 16 + 10 * 4 + 50 * 2
    # no sinks in the block; k4v2 block (3 bits), 5 tokens at (8, 4) = 6 bits
    assert block_bit_sum((4, 2), 64, 128, 4, 5, (8, 4)) == 59 * 3 + 5 * 6
    # the default protect setting is fp16
    assert block_bit_sum(2, 64, 128, 4, 3) == 61 * 2 + 3 * 16
    # nothing protected is the plain count, whatever the protect setting
    assert block_bit_sum(2, 0, 64, 4, 0, 8) == block_bit_sum(2, 0, 64, 4) == 4 * 16 + 60 * 2
    # every non-sink token protected
    assert block_bit_sum(2, 0, 64, 4, 60, 4) == 4 * 16 + 60 * 4


@pytest.mark.parametrize(("start", "end", "sinks", "protected"), [
    (0, 64, 4, 61),  # only 60 non-sink tokens
    (64, 128, 4, 65),
    (0, 4, 8, 1),  # a block of sinks only
    (0, 64, 0, -1),
])
def test_block_bit_sum_refuses_more_protected_tokens_than_the_block_has(start, end, sinks, protected):
    with pytest.raises(ValueError, match="protected must be in"):
        block_bit_sum(2, start, end, sinks, protected, 4)


def test_protect_allowance_is_the_budget_left_after_the_cheapest_future():
    # a 633-token prompt, 4 sinks, budget 2.5: 1582.5 bits; all at 2 bits (sinks at 16) spends 1322,
    # leaving 260.5 bits, i.e. 130 tokens at 4 bits instead of 2
    prompt = 633
    assert 2.5 * prompt - (4 * 16 + 629 * 2) == 260.5
    # block 0: all its 60 non-sink tokens fit
    assert protect_allowance(MENU, 2.5, 2, 4, 0, 0.0, 64, prompt - 64, 4) == 60
    # block 2 after blocks 0 and 1 were committed fully protected (60 + 64 tokens at 4 bits)
    committed = 4 * 16 + 60 * 4 + 64 * 4
    left = 2.5 * prompt - committed - 64 * 2 - (prompt - 192) * 2
    assert left == 12.5
    assert protect_allowance(MENU, 2.5, 2, 4, 128, committed, 64, prompt - 192, 4) == 6
    # block 3 after block 2 took those 6: only half a bit left, no token fits
    committed += 6 * 4 + 58 * 2
    assert protect_allowance(MENU, 2.5, 2, 4, 192, committed, 64, prompt - 256, 4) == 0
    # fp16 protection costs 14 bits a token over 2: floor(260.5 / 14)
    assert protect_allowance(MENU, 2.5, 2, 16, 0, 0.0, 64, prompt - 64, 4) == math.floor(260.5 / 14) == 18


def test_protect_allowance_with_a_dearer_block_setting_and_pairs():
    # a budget of 3 over 128 tokens, no sinks: 384 bits. Block 0 at 4 bits (256) and block 1 at 2 (128)
    # spend it all: nothing may be protected, however cheap the protect setting over 4
    assert feasible_mask(MENU, 3.0, 0, 0.0, 64, 64, 0).tolist() == [True, True]
    assert protect_allowance(MENU, 3.0, 4, 8, 0, 0.0, 64, 64, 0) == 0
    # block 0 at 2 bits: 128 bits spare; protection at k4v2 (3 bits) costs 1 bit a token -> all 64
    assert protect_allowance(MENU, 3.0, 2, (4, 2), 0, 0.0, 64, 64, 0) == 64
    # ... at 8 bits it costs 6 a token -> floor(128 / 6) = 21
    assert protect_allowance(MENU, 3.0, 2, 8, 0, 0.0, 64, 64, 0) == 21


@pytest.mark.parametrize(("setting", "protect"), [(4, 4), (4, 2), ((4, 2), 2), (4, (2, 4))])
def test_protection_costing_no_more_than_the_setting_allows_every_non_sink_token(setting, protect):
    # even where the budget has nothing to spare (the minimum average: no bit left for anything)
    tight = min_average_bits(MENU, 128, 4)
    assert protect_allowance(MENU, tight, setting, protect, 0, 0.0, 64, 64, 4) == 60
    assert protect_allowance(MENU, tight, setting, protect, 64, 0.0, 64, 0, 4) == 64


def test_protect_allowance_is_never_negative_and_counts_only_non_sink_tokens():
    # the budget is the minimum average: block 0 at 2 leaves exactly nothing to spare
    tight = min_average_bits(MENU, 128, 4)
    assert protect_allowance(MENU, tight, 2, 16, 0, 0.0, 64, 64, 4) == 0
    # a generous budget: capped at the block's non-sink tokens (70 sinks: the block's first 6 only)
    assert protect_allowance(MENU, 15.0, 2, 4, 64, 64 * 16.0, 64, 0, 70) == 58
