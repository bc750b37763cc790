"""Named, seeded episode sets (CompilerGym's "benchmarks"): which episodes training and evaluation use.

An episode is a task item with its fixed shots (``reset(options={"row": r})``: the shots depend only
on the split seed and the row), so a set is a tuple of rows. A fixed set means every episode's
full-precision reference is computed once and then read from the reference store, and two runs that
name the same set see the same episodes. Names say how the set is built, so a name is enough to
rebuild it anywhere:

- ``train-<seed>-<n>``: ``n`` distinct rows of the train split (the shot pool), drawn with ``seed``;
- ``eval-<n>``: the first ``n`` rows of the held-out split, in the order ``evaluate`` takes them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from envs.hellaswag import HellaSwagItem

__all__ = ["EpisodeSet", "EpisodeSetName", "parse_episode_set", "episode_set"]

_TRAIN = re.compile(r"train-(\d+)-(\d+)")
_EVAL = re.compile(r"eval-(\d+)")


@dataclass(frozen=True)
class EpisodeSetName:
    """A parsed set name: the split it draws from, the seed (train sets only) and the size."""

    split: str
    seed: int | None
    size: int


@dataclass(frozen=True)
class EpisodeSet:
    """A named set of episodes: the rows of ``split`` that ``reset()`` draws from."""

    name: str
    split: str
    rows: tuple[int, ...]


def parse_episode_set(name: str) -> EpisodeSetName:
    """``"train-3-200"`` -> (train, seed 3, 200 rows); ``"eval-100"`` -> (eval, 100 rows); else ValueError."""
    if m := _TRAIN.fullmatch(str(name)):
        parsed = EpisodeSetName("train", int(m[1]), int(m[2]))
    elif m := _EVAL.fullmatch(str(name)):
        parsed = EpisodeSetName("eval", None, int(m[1]))
    else:
        raise ValueError(f"unknown episode set {name!r}; use 'train-<seed>-<n>' or 'eval-<n>'")
    if parsed.size < 1:
        raise ValueError(f"episode set {name!r} has no episodes; n must be >= 1")
    return parsed


def episode_set(name: str, split_items: Sequence[HellaSwagItem]) -> EpisodeSet:
    """Build set ``name`` from the items of its split (``env.items``: already split and in split order)."""
    parsed = parse_episode_set(name)
    if parsed.size > len(split_items):
        raise ValueError(f"episode set {name!r} asks for {parsed.size} episodes; the split has {len(split_items)}")
    if parsed.seed is None:
        rows = [item.row for item in split_items[: parsed.size]]
    else:
        ordered = sorted(item.row for item in split_items)  # independent of the order items came in
        picked = np.random.default_rng(parsed.seed).choice(len(ordered), size=parsed.size, replace=False)
        rows = [ordered[i] for i in picked]
    return EpisodeSet(name=str(name), split=parsed.split, rows=tuple(rows))
