"""quant.uniform: error bounds, lossless packing, exact byte counts, concat, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from quant.uniform import (
    SUPPORTED_BITS,
    QuantizedTensor,
    check_bits,
    concat,
    dequantize,
    dequantize_cat,
    dequantize_gathered,
    expected_nbytes,
    gather,
    narrow,
    pack_codes,
    packed_length,
    quantize,
    unpack_codes,
    unstack,
)

QUANT_BITS = (2, 3, 4, 8)


def _per_element(params: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Per-group parameters repeated back to one per element (test-side reference, slow is fine)."""
    n = qt.shape[qt.axis]
    return params.float().repeat_interleave(qt.group_size, dim=qt.axis).narrow(qt.axis, 0, n)


def _reference_unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Obvious shift-and-mask unpacking, to check the fast byte-widening one against."""
    per_byte = 8 // bits
    codes = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    return torch.stack(codes, dim=-1).flatten(-2)[..., :length]


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("axis", (-1, -2))
@pytest.mark.parametrize("group_size", (1, 16, 64, 100))
@pytest.mark.parametrize("symmetric", (False, True))
def test_round_trip_error_is_at_most_half_a_step(bits, axis, group_size, symmetric):
    torch.manual_seed(0)
    # Odd sizes on both axes so that partial groups and padded packing both occur; a wide range of
    # magnitudes (and a constant row) so that scale rounding to fp16 is exercised.
    x = torch.randn(2, 3, 130, 72) * torch.logspace(-3, 2, 72)
    x[0, 0, 5] = 0.7
    qt = quantize(x, bits, axis=axis, group_size=group_size, symmetric=symmetric)
    err = (dequantize(qt) - x).abs()
    half_step = _per_element(qt.scale, qt) / 2
    bound = half_step * (1 + 1e-5) + 1e-6 * x.abs() + 1e-7
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    if group_size > 1:  # (a group of one is reproduced almost exactly: nothing to check there)
        # The bound is not vacuous: the error does reach a sizeable part of half a step somewhere.
        assert float((err / half_step.clamp_min(1e-12)).max()) > 0.4


def test_16_bits_is_an_fp16_round_trip():
    x = torch.randn(2, 3, 50, 16) * 10
    qt = quantize(x, 16, axis=-2)
    assert qt.scale is None and qt.zero is None and qt.data.dtype == torch.float16
    assert torch.equal(dequantize(qt), x.half().float())
    assert qt.nbytes() == 2 * x.numel() == qt.fp16_nbytes()


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("length", (1, 2, 3, 5, 7, 63, 64, 65))
def test_packing_is_lossless(bits, length):
    torch.manual_seed(length)
    codes = torch.randint(0, 1 << bits, (2, 3, length), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    # 3-bit: a plane of the low two bits (four to a byte), then one of the high bit (eight to a byte)
    width = math.ceil(length / 4) + math.ceil(length / 8) if bits == 3 else math.ceil(length * bits / 8)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == width == packed_length(length, bits)
    assert torch.equal(unpack_codes(packed, bits, length), codes)
    if bits in (2, 4):
        assert torch.equal(unpack_codes(packed, bits, length), _reference_unpack(packed, bits, length))
    if bits == 3:
        split = math.ceil(length / 4)
        low = _reference_unpack(packed[..., :split], 2, length)
        high = _reference_unpack(packed[..., split:], 1, length)
        assert torch.equal(low | (high << 2), codes)


def test_three_bit_codes_take_three_eighths_of_a_byte():
    codes = torch.randint(0, 8, (5, 7, 64), dtype=torch.uint8)
    assert pack_codes(codes, 3).numel() == codes.numel() * 3 // 8


def test_pack_does_not_alias_its_input():
    codes = torch.randint(0, 256, (4, 8), dtype=torch.uint8)
    packed = pack_codes(codes, 8)
    packed.zero_()
    assert codes.any()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", (False, True))
def test_nbytes_matches_a_hand_count_and_the_formula(bits, symmetric):
    shape, axis, group = (2, 3, 130, 20), -2, 64
    qt = quantize(torch.randn(shape), bits, axis=axis, group_size=group, symmetric=symmetric)
    if bits == 16:
        hand = 2 * 2 * 3 * 130 * 20
    else:
        row_bytes = {2: 5, 3: 5 + 3, 4: 10, 8: 20}[bits]  # 20 codes; 3-bit: ceil(20/4) + ceil(20/8)
        code_bytes = 2 * 3 * 130 * row_bytes  # packed along the last dim, padded
        groups = 2 * 3 * math.ceil(130 / group) * 20  # one group per 64 tokens per channel
        hand = code_bytes + groups * 2 * (1 if symmetric else 2)  # fp16 scale (+ fp16 zero)
    assert qt.nbytes() == hand == expected_nbytes(shape, bits, axis, group, symmetric)


def test_memory_ratio_at_4_and_2_bits_for_a_kv_block():
    """64-token groups on keys and 64-channel groups on values: the overhead the cache budgets for."""
    keys = quantize(torch.randn(1, 3, 1024, 64), 4, axis=-2, group_size=64)
    values = quantize(torch.randn(1, 3, 1024, 64), 4, axis=-1, group_size=64)
    ratio = (keys.nbytes() + values.nbytes()) / (keys.fp16_nbytes() + values.fp16_nbytes())
    assert ratio == pytest.approx(0.28125)
    keys2 = quantize(torch.randn(1, 3, 1024, 64), 2, axis=-2, group_size=64)
    assert keys2.nbytes() / keys2.fp16_nbytes() == pytest.approx(0.15625)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("axis", (-1, -2))
def test_concat_equals_quantizing_each_part(bits, axis):
    torch.manual_seed(1)
    parts = [torch.randn(1, 2, 64, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 30, 16)]
    quantized = [quantize(p, bits, axis=axis, group_size=64) for p in parts]
    merged = concat(quantized, dim=-2)
    assert merged.shape == (1, 2, 222, 16)
    assert torch.equal(dequantize(merged), torch.cat([dequantize(q) for q in quantized], dim=-2))
    assert merged.nbytes() == sum(q.nbytes() for q in quantized)


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_concat_along_the_packed_dimension(bits):
    parts = [torch.randn(2, 5, 8), torch.randn(2, 5, 3)]
    quantized = [quantize(p, bits, axis=-2, group_size=4) for p in parts]
    merged = concat(quantized, dim=-1)
    assert torch.equal(dequantize(merged), torch.cat([dequantize(q) for q in quantized], dim=-1))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("axis", (-1, -2))
@pytest.mark.parametrize("group_size", (16, 64, 100))
def test_dequantize_into_a_slice_and_a_larger_batch(bits, axis, group_size):
    """The cache's fast path: write straight into part of a bigger buffer, broadcasting the batch."""
    qt = quantize(torch.randn(1, 3, 130, 64), bits, axis=axis, group_size=group_size)
    buffer = torch.full((4, 3, 200, 64), float("nan"))
    dequantize(qt, out=buffer.narrow(-2, 10, 130))
    assert torch.equal(buffer[:, :, 10:140], dequantize(qt).expand(4, -1, -1, -1))
    assert buffer[:, :, :10].isnan().all() and buffer[:, :, 140:].isnan().all()
    with pytest.raises(ValueError, match="cannot receive"):
        dequantize(qt, out=torch.empty(1, 3, 129, 64))


@pytest.mark.parametrize("axis", (-1, -2))
@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize(
    "lengths",
    [(64, 128, 64, 64, 64, 20), (64, 30, 64, 64)],  # groups line up / a partial group in the middle
)
def test_dequantize_cat_of_mixed_bits_equals_concatenated_dequantize(axis, symmetric, lengths):
    """The cache's read path: parts of different bits (equal bits not adjacent) into one buffer."""
    torch.manual_seed(2)
    bits = (4, 2, 16, 4, 8, 3)[: len(lengths)]
    parts = [
        quantize(torch.randn(1, 3, n, 64), b, axis=axis, group_size=64, symmetric=symmetric)
        for n, b in zip(lengths, bits, strict=True)
    ]
    expected = torch.cat([dequantize(p) for p in parts], dim=-2)
    buffer = torch.full((2, 3, sum(lengths) + 5, 64), float("nan"))
    dequantize_cat(parts, buffer.narrow(-2, 0, sum(lengths)), dim=-2)
    assert torch.equal(buffer[:, :, : sum(lengths)], expected.expand(2, -1, -1, -1))
    assert buffer[:, :, sum(lengths) :].isnan().all()
    along_packed = [
        quantize(torch.randn(1, 3, 8, n), b, axis=axis, group_size=4) for n, b in ((7, 4), (9, 2))
    ]
    wide = dequantize_cat(along_packed, torch.empty(1, 3, 8, 16), dim=-1)  # packed bytes do not line up
    assert torch.equal(wide, torch.cat([dequantize(p) for p in along_packed], dim=-1))
    with pytest.raises(ValueError, match="share axis"):
        dequantize_cat([parts[0], quantize(torch.randn(1, 3, 64, 64), 4, axis=axis, group_size=32)], buffer)


@pytest.mark.parametrize("axis", [-2, -1])
def test_gather_joins_equal_bits_and_its_views_hold_each_code_once(axis):
    """The cache's per-step read: 2-, 4-bit and fp16 parts alternating; each width becomes one chunk with
    the positions its parts take, and the parts come back as views into the chunks, equal to the originals."""
    torch.manual_seed(3)
    parts = [quantize(torch.randn(1, 3, 64, 64), b, axis=axis, group_size=64) for b in (2, 4, 16, 2, 4, 16)]
    g = gather(parts, dim=-2)
    assert [qt.bits for qt, _ in g.chunks] == [2, 4, 16]
    assert g.aligned
    for (qt, ranges), first in zip(g.chunks, (0, 64, 128), strict=True):
        assert qt.shape[-2] == 128
        assert ranges == ((first, 64), (first + 192, 64))
    for i, (view, part) in enumerate(zip(g.parts, parts, strict=True)):
        chunk = g.chunks[i % 3][0]
        assert view.data.untyped_storage().data_ptr() == chunk.data.untyped_storage().data_ptr()
        assert view.nbytes() == part.nbytes()
        assert torch.equal(dequantize(view), dequantize(part))
    out = torch.full((2, 3, 384, 64), float("nan"))  # a larger batch: the parts broadcast (the cache's branch)
    expected = torch.cat([dequantize(p) for p in parts], dim=-2).expand(2, -1, -1, -1)
    assert torch.equal(dequantize_gathered(g, out), expected)


def test_gather_starts_a_new_chunk_after_a_partial_group():
    """Along the quantized axis a part that ends mid-group cannot be joined to (its last group would
    take the next part's tokens), and one multiply-add cannot span the parts; along the other axis it can,
    and neighbouring parts of a chunk make one range."""
    torch.manual_seed(4)
    for axis, chunks in ((-2, [((0, 30),), ((30, 64), (100, 64))]), (-1, [((0, 94), (100, 64))])):
        parts = [quantize(torch.randn(1, 2, n, 64), b, axis=axis, group_size=64) for n, b in ((30, 4), (64, 4), (6, 2),
                                                                                              (64, 4))]
        g = gather(parts, dim=-2)
        assert [ranges for _, ranges in g.chunks if _.bits == 4] == chunks
        assert g.aligned == (axis == -1)
        out = torch.empty(1, 2, 164, 64)
        assert torch.equal(dequantize_gathered(g, out), torch.cat([dequantize(p) for p in parts], dim=-2))
    # fp16 sink tokens before a quantized block: no groups of their own to complete, but they would still
    # take one group's place in the concatenated parameters, so no shared multiply-add (seen failing)
    sinks = [quantize(torch.randn(1, 2, 4, 64), 16, axis=-2), quantize(torch.randn(1, 2, 44, 64), 2, axis=-2)]
    g = gather(sinks, dim=-2)
    assert not g.aligned
    assert torch.equal(dequantize_gathered(g, torch.empty(1, 2, 48, 64)), torch.cat([dequantize(p) for p in sinks], -2))


def test_gather_joins_only_parts_of_one_label():
    """``labels``: parts of equal bits but other labels stay apart (a cache's keys chunked like its values)."""
    torch.manual_seed(5)
    parts = [quantize(torch.randn(1, 2, 64, 64), 4, axis=-2, group_size=64) for _ in range(4)]
    g = gather(parts, dim=-2, labels=["a", "b", "a", "b"])
    assert [ranges for _, ranges in g.chunks] == [((0, 64), (128, 64)), ((64, 64), (192, 64))]
    out = torch.empty(1, 2, 256, 64)
    assert torch.equal(dequantize_gathered(g, out), torch.cat([dequantize(p) for p in parts], dim=-2))
    with pytest.raises(ValueError, match="one label per part"):
        gather(parts, dim=-2, labels=["a"])


def test_narrow_is_a_view_and_refuses_what_would_split_a_group_or_a_byte():
    qt = quantize(torch.randn(1, 2, 128, 64), 2, axis=-2, group_size=64)
    part = narrow(qt, -2, 64, 64)
    assert part.data.untyped_storage().data_ptr() == qt.data.untyped_storage().data_ptr()
    assert torch.equal(dequantize(part), dequantize(qt)[..., 64:, :])
    with pytest.raises(ValueError, match="does not begin a group"):
        narrow(qt, -2, 32, 64)
    with pytest.raises(ValueError, match="packed along the last dimension"):
        narrow(qt, -1, 0, 32)
    with pytest.raises(ValueError, match="outside"):
        narrow(qt, -2, 64, 65)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("axis", (-1, -2))
def test_unstack_gives_the_pieces_narrow_gives(bits, axis):
    """A stacked commit's codes cut per layer: the same views as one narrow per piece."""
    qt = quantize(torch.randn(6, 2, 40, 16), bits, axis=axis, group_size=16)
    pieces = unstack(qt, 3)
    assert len(pieces) == 3
    for i, piece in enumerate(pieces):
        expected = narrow(qt, 0, 2 * i, 2)
        assert piece.shape == expected.shape == (2, 2, 40, 16) and piece.nbytes() == expected.nbytes()
        assert piece.data.untyped_storage().data_ptr() == qt.data.untyped_storage().data_ptr()
        assert torch.equal(dequantize(piece), dequantize(expected))
    with pytest.raises(ValueError, match="equal pieces"):
        unstack(qt, 4)
    if bits != 16:
        with pytest.raises(ValueError, match="quantized axis"):
            unstack(quantize(torch.randn(4, 8), bits, axis=0, group_size=4), 2)


def test_dequantize_honours_dtype():
    qt = quantize(torch.randn(2, 8, 64), 4, axis=-1)
    assert dequantize(qt, torch.float16).dtype == torch.float16
    assert torch.allclose(dequantize(qt, torch.float16).float(), dequantize(qt), atol=1e-2)


def test_bad_input_is_rejected_with_a_clear_message():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="unsupported bit-width 5"):
        quantize(x, 5)
    with pytest.raises(ValueError, match="unsupported bit-width"):
        check_bits(1)
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.empty(0, 4), 4)
    with pytest.raises(ValueError, match="group_size"):
        quantize(x, 4, group_size=0)
    with pytest.raises(ValueError, match="axis"):
        quantize(x, 4, axis=2)
    with pytest.raises(ValueError, match="same bits"):
        concat([quantize(x, 4), quantize(x, 2)], dim=0)
    with pytest.raises(ValueError, match="complete group"):
        concat([quantize(torch.randn(2, 30), 4, axis=-1), quantize(x, 4, axis=-1)], dim=-1)
    with pytest.raises(ValueError, match="nothing"):
        concat([], dim=0)
    with pytest.raises(ValueError, match="bit planes"):
        concat([quantize(x, 3, axis=-2), quantize(x, 3, axis=-2)], dim=-1)
    with pytest.raises(ValueError, match="16-bit"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 16)
