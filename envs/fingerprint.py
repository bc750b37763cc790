"""Where a record was computed: the fingerprint that says which per-item scores may be compared.

Quantized per-item scores are reproducible on one machine (thread count and transformers 5.23 vs
5.24 make no difference) but not across machines: another CPU gives the same items a different
gold log-likelihood at 2 or 4 bits, enough to flip some acc_norm outcomes. So every evaluation
record names the fingerprint of what computed it, and records of different fingerprints are not
mixed silently. Threads are deliberately left out (they do not change results); the CPU's model
name and vector capability are in, because those do.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import torch

UNKNOWN = "unknown"  # the fingerprint id of records written before records carried one
PACKAGES = ("torch", "transformers", "numpy", "optimum-quanto")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's marketing name where the OS tells it (Linux); None elsewhere."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return None


def fingerprint(device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> dict:
    """Package versions, device, CPU capability and dtype of the process computing records on ``device``."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "packages": {p: _version(p) for p in PACKAGES},
        "device": {"type": device.type, "name": name},
        "cpu": {
            "arch": platform.machine(),
            "model": _cpu_model(),
            "capability": torch.backends.cpu.get_cpu_capability(),
        },
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
    }


def fingerprint_id(fp: dict) -> str:
    """A short stable id: the first 12 hex digits of the SHA-256 of the sorted JSON."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


_PROCESS_IDS: dict[tuple[str, str], str] = {}


def process_fingerprint_id(device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> str:
    """``fingerprint_id(fingerprint(device, dtype))``, computed once per process and (device, dtype):
    stored references are looked up with it on every reset, and package metadata is slow to read."""
    key = (str(torch.device(device)), str(dtype))
    if key not in _PROCESS_IDS:
        _PROCESS_IDS[key] = fingerprint_id(fingerprint(device, dtype))
    return _PROCESS_IDS[key]
