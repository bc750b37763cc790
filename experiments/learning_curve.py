"""The learning curve of an SB3 training run: one row per policy update, in wandb and in a CSV.

A row covers the env steps collected since the previous row (one rollout; for on-policy algorithms
that is the data of one policy update) and reports, against the cumulative env steps:

- ``episode_return``: mean *raw* return of the episodes that ended in it (Monitor's ``info["episode"]``,
  so the reward normalisation that the learner sees does not hide the scale of what it earns);
- ``damage``: mean ``-info["loglik_delta"]`` at their terminal steps (gold-ending log-lik lost vs fp16);
- ``avg_bits``: mean final ``info["avg_bits"]``;
- ``budget_enforced_rate``: share of steps whose ``info["budget_enforced"]`` is true (empty when the env
  does not report it), i.e. how often the env had to push the policy back under its bit budget;
- ``explained_variance`` and ``value_loss``: the critic's fit in the update that learned from those steps
  (SB3's ``train/explained_variance``/``train/value_loss``; empty for algorithms without a critic's update).

The CSV is appended one flushed row at a time, so it survives a crash or a run without wandb;
:func:`start_curve` trims it to a checkpoint when a run resumes, so resumed curves have no duplicate steps.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from envs.io import atomic_write
from experiments import tracking

CURVE_NAME = "learning_curve.csv"
COLUMNS = ("timesteps", "episodes", "episode_return", "damage", "avg_bits", "budget_enforced_rate",
           "explained_variance", "value_loss")
WANDB_PREFIX = "curve"
#: SB3 logger keys the critic's fit is read from (recorded by ``train()``, kept until the next dump).
_TRAIN_KEYS = {"explained_variance": "train/explained_variance", "value_loss": "train/value_loss"}


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, float | np.floating) else str(value)


def _write_rows(path: Path, rows: Iterable[dict[str, str]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def start_curve(path: str | os.PathLike, keep_through: int = 0) -> Path:
    """Make ``path`` a curve with the header and the rows of an earlier run up to ``keep_through`` env steps.

    ``keep_through=0`` starts a new curve. A resumed run passes the steps of the checkpoint it loaded: rows
    written after that checkpoint (by a run killed before its next one) are dropped, as the resumed run
    writes those steps again.
    """
    path = Path(path)
    kept: list[dict[str, str]] = []
    if keep_through > 0 and path.is_file():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r.get("timesteps", "").isdigit()
                    and int(r["timesteps"]) <= keep_through]
    _write_rows(path, kept)
    return path


def read_curve(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a curve CSV as floats (NaN where a value was not measured)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


class LearningCurveCallback(BaseCallback):
    """Collects per-step and per-episode info during rollouts and emits a curve row after each update.

    Rows are emitted at the start of the next rollout (when ``train()`` of the previous one has recorded the
    critic's fit) and at the end of training. Needs Monitor-wrapped envs (``make_vec_env`` does that) for raw
    episode returns. ``run`` is a wandb run (or None: CSV only); the CSV at ``path`` must have been prepared
    by :func:`start_curve`.
    """

    def __init__(self, path: str | os.PathLike, run: Any = None, verbose: int = 0):
        super().__init__(verbose)
        self.path = Path(path)
        self.run = run
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._steps = 0
        self._returns: list[float] = []
        self._damage: list[float] = []
        self._avg_bits: list[float] = []
        self._enforced: list[bool] = []

    def _on_training_start(self) -> None:
        if self.run is not None:
            tracking.define_curve(self.run, WANDB_PREFIX, "timesteps")

    def _on_step(self) -> bool:
        for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
            self._steps += 1
            if "budget_enforced" in info:
                self._enforced.append(bool(info["budget_enforced"]))
            if not done:
                continue
            if "episode" in info:
                self._returns.append(float(info["episode"]["r"]))
            if "loglik_delta" in info:
                self._damage.append(-float(info["loglik_delta"]))
            if "avg_bits" in info:
                self._avg_bits.append(float(info["avg_bits"]))
        return True

    def _on_rollout_start(self) -> None:
        self._emit()

    def _on_training_end(self) -> None:
        self._emit()

    def _emit(self) -> None:
        if self._steps == 0:  # the first rollout, or nothing collected since the last row
            return
        fit = self.model.logger.name_to_value  # .get: the logger's defaultdict must not gain zero entries
        row: dict[str, Any] = {
            "timesteps": int(self.num_timesteps),
            "episodes": len(self._returns),
            "episode_return": _mean(self._returns),
            "damage": _mean(self._damage),
            "avg_bits": _mean(self._avg_bits),
            "budget_enforced_rate": _mean([float(e) for e in self._enforced]),
            **{name: float(fit[key]) if key in fit else math.nan for name, key in _TRAIN_KEYS.items()},
        }
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: _cell(v) for k, v in row.items()})
            f.flush()
        if self.run is not None:
            tracking.log_curve(self.run, WANDB_PREFIX, row)
        self._reset_interval()
