"""Device and dtype options on the CPU: "auto" resolves to what it promises, bad values fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_env import ITEMS, TINY_CONFIG

from envs.kv_precision import KVPrecisionEnv
from envs.model import resolve_device, resolve_dtype


def _episode(env: KVPrecisionEnv, row: int, actions: list[int]):
    trace = [env.reset(options={"row": row})]
    done, t = False, 0
    while not done:
        obs, reward, done, _, info = env.step(actions[t % len(actions)])
        trace.append((obs, reward, info))
        t += 1
    return trace


def test_auto_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") is torch.float32  # CPU results stay those of explicit float32
    assert resolve_dtype("float16", "cpu") is torch.float16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", "auto") is (torch.bfloat16 if expected == "cuda" else torch.float32)


def test_cpu_auto_dtype_equals_explicit_float32_bit_for_bit():
    kw = dict(items=ITEMS, **TINY_CONFIG, bits=(2, (4, 2), 8, 16), sink_tokens=4, reference_store=False)
    auto = KVPrecisionEnv(**kw, device="cpu")  # dtype "auto" is the default
    explicit = KVPrecisionEnv(**kw, device="cpu", dtype="float32")
    assert auto.config.dtype == "auto" and auto.model.dtype == torch.float32 and auto.model.device.type == "cpu"
    row = auto.pool[0].row
    for a, b in zip(_episode(auto, row, [1, 0, 2]), _episode(explicit, row, [1, 0, 2]), strict=True):
        assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]  # observations, rewards and infos, exactly


@pytest.mark.parametrize(
    ("device", "dtype", "message"),
    [("gpu", "auto", "unknown device 'gpu'"), ("cpu", "float8", "Unknown dtype 'float8'")],
)
def test_bad_device_or_dtype_is_a_clear_error(device, dtype, message):
    with pytest.raises(ValueError, match=message):
        KVPrecisionEnv(items=ITEMS, **TINY_CONFIG, device=device, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device is visible")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(ValueError, match="no CUDA device is visible; use 'auto' or 'cpu'"):
        KVPrecisionEnv(items=ITEMS, **TINY_CONFIG, device="cuda")
