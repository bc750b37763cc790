"""The fused CPU dequantization kernel (``fused_dequantize.cpp``): built once per machine, checked once per process.

Why: reading a mixed-bit cache with torch ops costs 5-10 small ops per chunk of equal bits (unpack, convert,
multiply-add), on every layer's keys and values at every decode step; this kernel writes each output element
once (issue 14: mixed-bit decoding ≤ 15% slower than ``DynamicCache``). It is an accelerator only:

* It is compiled with ``torch.utils.cpp_extension`` the first time a process needs it (~40 s once; torch keeps
  the build under ``~/.cache/torch_extensions``). Where it cannot be built (no C++ compiler), or
  ``KVGYM_FUSED_DEQUANTIZE=0``, :func:`quant.uniform.dequantize` keeps its torch-op path.
* Its results are bit-identical to that path (a code times an fp16 scale is exact in float32), and each
  process checks that on random tensors before its first use; a kernel that disagrees is not used.
* CPU and float32 outputs only (the GPU path is already one fused elementwise graph per op).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # quant.uniform imports this module
    from quant.uniform import QuantizedTensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_dequantize.cpp")
#: Set to 0 to read with torch ops only (e.g. to compare speeds; results are the same).
ENV_SWITCH = "KVGYM_FUSED_DEQUANTIZE"
#: A build takes ~40 s; a build lock older than this was left by a build that was killed.
STALE_BUILD_LOCK_SECONDS = 600

_lock = threading.Lock()
_kernel: Any = None
_state = "untried"  # -> "ready" or "unavailable"
_switched_off = False  # fused_dequantize(False) in effect


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0" and not _switched_off


@contextmanager
def fused_dequantize(on: bool) -> Iterator[None]:
    """Within the block, use the kernel where available (True) or the torch ops only (False): what
    ``experiments.bench_cache`` times side by side. The environment variable still switches it off."""
    global _switched_off
    before, _switched_off = _switched_off, not on
    try:
        yield
    finally:
        _switched_off = before


def kernel() -> Any | None:
    """The checked extension module, or None (switched off, not buildable, or not exact here)."""
    global _kernel, _state
    if _state == "untried":
        with _lock:
            if _state == "untried":
                _kernel, _state = _build_and_check()
    return _kernel if _state == "ready" else None


def _build_and_check() -> tuple[Any, str]:
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        build_directory = _build_directory()
        if build_directory is not None:
            _remove_stale_build_lock(Path(build_directory) / "lock")
        log.info("loading the fused dequantize kernel (built once per machine, ~40 s): %s", SOURCE.name)
        module = load("kvgym_fused_dequantize", [str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as error:  # no compiler, no headers: the torch-op path does the same work
        log.warning("fused dequantize kernel unavailable (%s); reading with torch ops", error)
        return None, "unavailable"
    try:
        mismatch = _self_check(module)
    except Exception as error:  # a kernel that refuses the check's inputs is as untrustworthy as a wrong one
        mismatch = f"it raised {error!r}"
    if mismatch:
        log.warning("fused dequantize kernel disagrees with the torch ops (%s); not used", mismatch)
        return None, "unavailable"
    return module, "ready"


def _build_directory() -> str | None:
    """Where torch builds (and locks) this extension: ``$TORCH_EXTENSIONS_DIR`` or its cache default (None
    where this torch does not say: then no stale lock is looked for)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory("kvgym_fused_dequantize", verbose=False)
    except (ImportError, AttributeError, TypeError):
        return None


def _remove_stale_build_lock(lock: Path, max_age: float = STALE_BUILD_LOCK_SECONDS) -> bool:
    """Remove ``lock`` when it is older than ``max_age`` seconds; whether it did.

    Why: torch's build takes this lock and waits, with no time limit, for whoever holds it to finish; a
    build that was killed (Ctrl-C, a stopped job) never removes it, so every later process hung on its
    first read of a mixed-bit cache."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age:
        return False
    log.warning("removing a fused-kernel build lock left %.0f s ago by a build that did not finish: %s", age, lock)
    lock.unlink(missing_ok=True)
    return True


def _ninja_on_path() -> None:
    """torch's build runs ``ninja`` from PATH; a virtualenv that was not activated has the ``ninja`` package's
    binary off it, so its directory is appended where no other ninja is found."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), ninja.BIN_DIR])


def _self_check(module: Any) -> str | None:
    """The first case where the kernel differs from the torch ops bit for bit (None: none does)."""
    from quant.uniform import dequantize, quantize

    x = torch.randn(2, 3, 100, 70, generator=torch.Generator().manual_seed(0))
    for axis in (-2, -1):
        for bits in (2, 3, 4, 8):
            for symmetric in (False, True):
                qt = quantize(x, bits, axis, 64, symmetric)
                fused = torch.empty(qt.shape)
                _call(module, qt, fused)
                if not torch.equal(fused, dequantize(qt, out=torch.empty(qt.shape), fused=False)):
                    return f"axis {axis}, {bits} bits, symmetric={symmetric}"
    return None


def usable(out: torch.Tensor) -> bool:
    """Whether the kernel is on and can write into ``out`` at all: a 4-d CPU float32 tensor whose last
    dimension is contiguous (built and checked on the first call that gets this far)."""
    return (
        enabled() and out.dtype == torch.float32 and out.device.type == "cpu" and out.dim() == 4
        and out.stride(-1) == 1 and kernel() is not None
    )


def dequantize_into(qt: QuantizedTensor, out: torch.Tensor, rows: torch.Tensor | None = None) -> bool:
    """Write ``qt`` dequantized into ``out`` with the kernel; False (nothing written) where it does not apply:
    16 bits, another shape (a batch that ``qt`` broadcasts to), codes or parameters with a strided last
    dimension, zero-points not laid out like the scales, or :func:`usable` says no.

    ``rows`` (int64, one per token of ``qt``): the token of ``out`` each token of ``qt`` goes to, so that a
    chunk of equal bits lands in token order in one call; ``out`` then has any number of tokens."""
    shape = list(qt.shape)
    if rows is not None:
        shape[2] = out.shape[2] if out.dim() == 4 else -1
    fits = (
        qt.bits != 16 and tuple(out.shape) == tuple(shape) and qt.data.device.type == "cpu"
        and qt.data.stride(-1) == 1 and qt.scale.stride(-1) == 1
        and (qt.zero is None or qt.zero.stride() == qt.scale.stride())
    )
    if not fits or not usable(out):
        return False
    _call(kernel(), qt, out, rows)
    return True


_NO_ZERO = torch.empty(0, dtype=torch.float16)
_NO_ROWS = torch.empty(0, dtype=torch.int64)


def _call(module: Any, qt: QuantizedTensor, out: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    half = float((1 << (qt.bits - 1)) - 1)  # the symmetric mode's mid-point (unused with zero-points)
    zero = _NO_ZERO if qt.zero is None else qt.zero
    module.dequantize_into(qt.data, qt.scale, zero, qt.bits, qt.axis % 4, qt.group_size, half, out,
                           _NO_ROWS if rows is None else rows)
