"""The fused CPU dequantization kernel (quant/fused.py) writes exactly what the torch ops write."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from quant import fused
from quant.uniform import dequantize, dequantize_cat, quantize

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


@needs_compiler
def test_kernel_builds_and_passes_its_self_check():
    """Where a compiler exists the kernel must be there: a silent fall-back would hide a slow read."""
    assert fused.kernel() is not None


@needs_compiler
@pytest.mark.parametrize("axis", [-2, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 130, 64), (2, 2, 37, 24), (1, 1, 5, 7)])
def test_fused_equals_torch_ops_bit_for_bit(axis, bits, symmetric, shape):
    """Partial groups, lengths that leave a partly filled byte, and an ``out`` that is a slice of a larger
    buffer (as the cache writes each chunk into its place)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    qt = quantize(x, bits, axis, group_size=16, symmetric=symmetric)
    expected = dequantize(qt, fused=False)
    buffer = torch.full((shape[0], shape[1], shape[2] + 9, shape[3]), float("nan"))
    out = buffer.narrow(-2, 4, shape[2])
    assert fused.dequantize_into(qt, out)
    assert torch.equal(out, expected)
    assert buffer.narrow(-2, 0, 4).isnan().all() and buffer.narrow(-2, 4 + shape[2], 5).isnan().all()


@needs_compiler
def test_fused_declines_what_it_cannot_write():
    """fp16 tensors, a batch the codes broadcast to, fp16 outputs: the torch ops handle those."""
    qt = quantize(torch.randn(1, 2, 64, 64), 4, -2)
    assert not fused.dequantize_into(quantize(torch.randn(1, 2, 64, 64), 16, -2), torch.empty(1, 2, 64, 64))
    assert not fused.dequantize_into(qt, torch.empty(3, 2, 64, 64))
    assert not fused.dequantize_into(qt, torch.empty(1, 2, 64, 64, dtype=torch.float16))
    wide = torch.empty(3, 2, 64, 64)
    assert torch.equal(dequantize(qt, out=wide), dequantize(qt, fused=False).expand(3, -1, -1, -1))


def test_switched_off_reads_with_torch_ops(monkeypatch):
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    qt = quantize(torch.randn(1, 2, 64, 64), 2, -1)
    assert not fused.dequantize_into(qt, torch.empty(1, 2, 64, 64))
    assert torch.equal(dequantize(qt), dequantize(qt, fused=False))


@pytest.mark.parametrize("axis", [-2, -1])
def test_mixed_bit_read_is_the_same_with_and_without_the_kernel(axis, monkeypatch):
    """The cache's read of a concatenation of parts of different bits (quant.uniform.dequantize_gathered)."""
    gen = torch.Generator().manual_seed(3)
    parts = [quantize(torch.randn(1, 3, n, 64, generator=gen), b, axis) for n, b in
             ((64, 2), (64, 4), (4, 16), (128, 2), (64, 3), (64, 8), (20, 4))]
    fast = dequantize_cat(parts, torch.empty(1, 3, 408, 64))
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert torch.equal(fast, dequantize_cat(parts, torch.empty(1, 3, 408, 64)))


@needs_compiler
def test_rows_scatter_a_chunk_into_token_order():
    """``rows``: one call writes a chunk's tokens where its parts sit in the concatenation; a destination
    outside ``out`` is refused, not written."""
    qt = quantize(torch.randn(1, 2, 128, 64), 2, -2)
    out = torch.full((1, 2, 200, 64), float("nan"))
    rows = torch.cat([torch.arange(0, 64), torch.arange(136, 200)])
    assert fused.dequantize_into(qt, out, rows)
    expected = dequantize(qt, fused=False)
    assert torch.equal(out[:, :, :64], expected[:, :, :64]) and torch.equal(out[:, :, 136:], expected[:, :, 64:])
    assert out[:, :, 64:136].isnan().all()
    with pytest.raises(RuntimeError, match="out of range"):
        fused.dequantize_into(qt, out, rows + 1)


def test_a_kernel_that_fails_its_check_is_not_used(monkeypatch):
    """Wrong numbers, or an error, in the self-check: the torch ops read instead, and nothing raises."""

    class Wrong:
        @staticmethod
        def dequantize_into(data, scale, zero, bits, axis, group_size, half, out, rows):
            out.fill_(0.0)

    class Raising:
        @staticmethod
        def dequantize_into(*args):
            raise RuntimeError("bad build")

    for module in (Wrong, Raising):
        monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *args, m=module, **kwargs: m)
        assert fused._build_and_check() == (None, "unavailable")


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build that was killed leaves torch's lock behind, and every later build would wait on it forever."""
    lock = tmp_path / "lock"
    assert not fused._remove_stale_build_lock(lock)  # none there
    lock.touch()
    assert not fused._remove_stale_build_lock(lock, max_age=600) and lock.exists()  # a build may be running
    old = time.time() - 601
    os.utime(lock, (old, old))
    assert fused._remove_stale_build_lock(lock, max_age=600) and not lock.exists()
    assert fused._build_directory().endswith("kvgym_fused_dequantize")
