"""Small I/O and reproducibility helpers shared by experiment scripts."""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.io import atomic_write

__all__ = ["write_text", "write_json", "write_jsonl", "read_jsonl", "seed_everything", "to_jsonable"]


def to_jsonable(obj: Any) -> Any:
    """Turn numpy/torch scalars, tuples and paths into plain JSON; NaN/inf become null (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write next to the target then ``os.replace``, so readers never see a half-written file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    text = "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in rows)
    return write_text(path, text)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch global RNGs (code that matters should still pass explicit generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
