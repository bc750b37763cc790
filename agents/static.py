"""A static schedule: one setting per position in the prompt (and per layer group), the same on every item.

The search baseline a learned policy must beat (CompilerGym's lesson: plain search beats plain RL
until shown otherwise). It reads only the ``progress`` observation, ``(block index + 1) / blocks``,
so prompts of different lengths share a schedule by *fraction* of the prompt: ``bins`` equal-width
bins of (0, 1], bin ``i`` holding the blocks whose progress lies in ``(i / bins, (i + 1) / bins]``
(the block's end position; 4 blocks in 2 bins split 2 + 2). ``experiments.search_static`` fits one on
pool items under a bit budget; the JSON file it writes (:meth:`StaticSchedulePolicy.save`) holds the
menu, the bins, the schedule as setting names, the budget and the search log, and is loaded with the
policy spec ``static:<path.json>``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Policy
from envs.io import atomic_write
from envs.settings import Setting, normalize_setting, parse_setting, setting_name

FORMAT = "kvgym-static-schedule"
VERSION = 1
#: Progress values this close below a bin edge count as on it: the observation is float32.
_EDGE_TOLERANCE = 1e-6


def position_bin(progress: Any, bins: int) -> np.ndarray:
    """The bin of each ``progress`` value in (0, 1]: ``ceil(progress * bins) - 1``, clipped to the bins."""
    p = np.asarray(progress, dtype=np.float64)
    return np.clip(np.ceil(p * bins - _EDGE_TOLERANCE) - 1, 0, bins - 1).astype(np.int64)


def block_progress(n_blocks: int) -> np.ndarray:
    """The ``progress`` observation of each block of an ``n_blocks`` prompt, as the env gives it (float32)."""
    return np.asarray([(b + 1) / n_blocks for b in range(n_blocks)], dtype=np.float32)


class StaticSchedulePolicy(Policy):
    """Plays ``schedule[bin][group]`` (setting names or settings) at every block of position bin ``bin``.

    ``schedule`` has one entry per bin; each is a setting (every layer group gets it) or a list of
    one setting per layer group. ``budget`` and ``log`` only travel with the file (what the schedule
    was fitted for and how).
    """

    def __init__(
        self,
        observation_names: Sequence[str],
        bits: Sequence[Any],
        schedule: Sequence[Any],
        *,
        budget: float | None = None,
        log: list[dict[str, Any]] | None = None,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__(observation_names, bits)
        if not schedule:
            raise ValueError("a static schedule needs at least one bin")
        rows = [list(entry) if isinstance(entry, (list, tuple)) and not _is_pair(entry) else [entry]
                for entry in schedule]
        widths = {len(r) for r in rows}
        if len(widths) != 1 or 0 in widths:
            raise ValueError(f"every bin of a static schedule needs the same number (>= 1) of layer-group settings, "
                             f"got {[len(r) for r in rows]}")
        settings = [[_read_setting(s) for s in row] for row in rows]
        menu = [setting_name(b) for b in self.bits]
        missing = sorted({setting_name(s) for row in settings for s in row if s not in self.bits})
        if missing:
            raise ValueError(f"static schedule uses setting(s) {missing} that the env's menu {menu} lacks; "
                             "run it on an env whose bits hold them")
        self.progress_column = self.column("progress")
        #: menu indices, [bins, schedule groups]
        self.table = np.asarray([[self.bits.index(s) for s in row] for row in settings], dtype=np.int64)
        self.bins = len(rows)
        self.schedule_groups = widths.pop()
        self.budget = None if budget is None else float(budget)
        self.log = list(log or [])
        self.meta = dict(meta or {})
        self.name = "static"

    # ------------------------------------------------------------------------------------------- acting
    def set_layer_groups(self, groups: int) -> None:
        super().set_layer_groups(groups)
        if self.schedule_groups != 1 and self.schedule_groups != groups:
            raise ValueError(f"this static schedule has {self.schedule_groups} settings per bin (one per layer group); "
                             f"the env has layer_groups={groups}")

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        if self.schedule_groups != self.layer_groups and self.schedule_groups != 1:
            raise ValueError(f"this static schedule has {self.schedule_groups} settings per bin (one per layer group); "
                             f"the policy acts for layer_groups={self.layer_groups}")
        rows = self.table[position_bin(obs2d[:, self.progress_column], self.bins)]
        return rows[:, 0] if self.schedule_groups == 1 else rows

    def actions_for(self, n_blocks: int) -> list[int | list[int]]:
        """The actions this policy takes on a prompt of ``n_blocks`` blocks (it reads nothing else), in
        ``agents.rollout.Episode.actions`` form: what a search can key its episode cache on."""
        rows = self.table[position_bin(block_progress(n_blocks), self.bins)]
        if self.layer_groups == 1 and self.schedule_groups == 1:
            return [int(r[0]) for r in rows]
        return [[int(a) for a in np.broadcast_to(r, (self.layer_groups,))] for r in rows]

    def schedule_names(self) -> list[list[str]]:
        """The schedule as setting names, ``[bins][schedule groups]``."""
        return [[setting_name(self.bits[a]) for a in row] for row in self.table]

    # ------------------------------------------------------------------------------------------ the file
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "bits": [setting_name(b) for b in self.bits],
            "bins": self.bins,
            "layer_groups": self.schedule_groups,
            "schedule": self.schedule_names(),
            "budget": self.budget,
            **self.meta,
            "log": self.log,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule as JSON, atomically (see the module docstring for what it holds)."""
        text = json.dumps(_finite(self.to_dict()), indent=1) + "\n"

        def write(tmp: str) -> None:
            Path(tmp).write_text(text, encoding="utf-8")

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, observation_names: Sequence[str], bits: Sequence[Any]) -> StaticSchedulePolicy:
        """The schedule in ``path``, acting on an env with ``observation_names`` and menu ``bits``."""
        doc = read_schedule(path)
        meta = {k: v for k, v in doc.items() if k not in ("format", "version", "bits", "bins", "layer_groups",
                                                           "schedule", "budget", "log")}
        return cls(observation_names, bits, doc["schedule"], budget=doc.get("budget"), log=doc.get("log"), meta=meta)


def read_schedule(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON document of a static-schedule file, checked for the keys a policy needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"static schedule {path} not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "schedule" not in doc:
        raise ValueError(f"{path} is not a static schedule (expected JSON with format {FORMAT!r} and a 'schedule'; "
                         "experiments.search_static writes one)")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: static schedule version {doc.get('version')!r}; this code reads version {VERSION}")
    if len(doc["schedule"]) != doc.get("bins", len(doc["schedule"])):
        raise ValueError(f"{path}: 'bins' is {doc['bins']} but the schedule has {len(doc['schedule'])} entries")
    return doc


def _is_pair(entry: Any) -> bool:
    """``[4, 2]`` in a schedule entry is one (key_bits, value_bits) setting, not two groups' settings."""
    return isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, (int, np.integer)) for x in entry)


def _read_setting(value: Any) -> Setting:
    return parse_setting(value) if isinstance(value, str) else normalize_setting(value)


def _finite(obj: Any) -> Any:
    """Strict JSON: NaN/inf become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
