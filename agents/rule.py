"""The hand-made entropy rule: more bits where the model is less sure of the next token.

High next-token entropy marks text the model finds hard to predict; the rule bets that the keys and
values of such stretches matter more later and keeps them at higher precision. It is the policy the
learned ones must beat, and the labeller for the MLP controller's training data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agents.base import Policy
from envs.io import atomic_write
from envs.settings import mean_bits, normalize_menu, settings_by_cost

#: Default thresholds (nats) for 4 bit-widths. Block-mean next-token entropy of SmolLM2-135M on k-shot
#: HellaSwag prompts mostly lies in ~1.5-4 nats; these split that range so all four widths occur.
#: They are placeholders: re-fit them on collected data with :func:`calibrate_thresholds`.
DEFAULT_THRESHOLDS: tuple[float, ...] = (2.0, 2.75, 3.5)
#: Range that default thresholds for other bit sets are spread evenly over.
DEFAULT_RANGE: tuple[float, float] = (2.0, 3.5)


def default_thresholds(n_bits: int) -> tuple[float, ...]:
    """``n_bits - 1`` increasing thresholds: the 4-width defaults, or an even spread of the same range."""
    if n_bits == 4:
        return DEFAULT_THRESHOLDS
    if n_bits == 1:
        return ()
    return tuple(float(t) for t in np.linspace(*DEFAULT_RANGE, n_bits - 1))


def _check_thresholds(thresholds: Sequence[float], n_bits: int) -> tuple[float, ...]:
    ts = tuple(float(t) for t in thresholds)
    if len(ts) != n_bits - 1:
        raise ValueError(f"need {n_bits - 1} thresholds for {n_bits} bit-widths, got {len(ts)}: {ts}")
    if any(np.isnan(ts)) or any(b < a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"thresholds must be non-decreasing numbers, got {ts}")
    return ts


def max_entropy_fractions(bits: Sequence[Any], target_avg_bits: float) -> np.ndarray:
    """Class fractions over ``bits`` by ascending cost with mean exactly ``target_avg_bits``.

    A ``(key_bits, value_bits)`` pair counts its mean bits (``envs.settings.mean_bits``: K4V2 is 3), the
    order of :func:`envs.settings.settings_by_cost`, so a pair menu calibrates like a width menu.

    Of all such mixes this is the maximum-entropy one, ``p_k ∝ exp(θ·b_k)`` (the least committal: no
    width is starved unless the target forces it). The mean is strictly increasing in θ, so θ is found
    by bisection; the endpoints (target = min or max bits) are the one-hot mixes.
    """
    b = np.sort(np.asarray([mean_bits(s) for s in bits], dtype=np.float64))
    lo_b, hi_b = float(b[0]), float(b[-1])
    if not lo_b <= target_avg_bits <= hi_b:
        raise ValueError(f"target_avg_bits={target_avg_bits} must lie in [{lo_b:g}, {hi_b:g}]")
    if target_avg_bits in (lo_b, hi_b) or len(b) == 1:
        return (b == target_avg_bits).astype(np.float64) if len(b) > 1 else np.ones(1)

    def mix(theta: float) -> np.ndarray:
        z = theta * (b - b.max())  # shift for numerical stability
        w = np.exp(z - z.max())
        return w / w.sum()

    span = 50.0 / (hi_b - lo_b)  # |θ|·range of 50 already gives a near one-hot mix
    lo, hi = -span, span
    while mix(lo) @ b > target_avg_bits:
        lo *= 2
    while mix(hi) @ b < target_avg_bits:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mix(mid) @ b < target_avg_bits else (lo, mid)
    return mix(0.5 * (lo + hi))


def calibrate_thresholds(
    entropies: np.ndarray,
    bits: Sequence[Any],
    target_avg_bits: float,
) -> tuple[float, ...]:
    """Thresholds under which the rule spends ``target_avg_bits`` on average over ``entropies``.

    Method: (1) pick the class fractions ``p`` over ascending ``bits`` with mean exactly the target —
    the maximum-entropy mix :func:`max_entropy_fractions`, so no width is dropped unless the target
    forces it; (2) sort the entropies and cut them at the cumulative fractions: the lowest
    ``p_0`` share gets the fewest bits, the next ``p_1`` the next width, and so on. The rule's shape
    (monotone: more entropy never means fewer bits) is kept by construction. Each threshold sits halfway
    between the two entropies either side of its cut so it generalises to unseen blocks; on the
    calibration data itself the average bits then miss the target only by count rounding (at most
    ``(len(bits)-1)·(max-min bits)/(2n)``), plus whatever ties straddling a cut add. A cut at 0% or
    100% becomes -inf/+inf.
    """
    x = np.sort(np.asarray(entropies, dtype=np.float64).reshape(-1))
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("calibrate_thresholds needs at least one finite entropy value")
    p = max_entropy_fractions(bits, target_avg_bits)
    n = x.size
    cuts = np.rint(np.cumsum(p)[:-1] * n).astype(int)
    out = []
    for c in cuts:
        if c <= 0:
            out.append(-np.inf)
        elif c >= n:
            out.append(np.inf)
        else:
            out.append(0.5 * (x[c - 1] + x[c]))
    return tuple(float(t) for t in out)


class EntropyRulePolicy(Policy):
    """``bits`` (ascending) chosen by which interval of ``thresholds`` the block's ``feature`` falls in.

    With bits (2, 4, 8, 16) and thresholds (t1, t2, t3): 2 bits if x < t1, 4 if x < t2, 8 if x < t3,
    else 16. Any number of widths works with ``len(bits) - 1`` thresholds.
    """

    name = "rule"

    def __init__(
        self,
        observation_names: Sequence[str],
        bits: Sequence[int],
        thresholds: Sequence[float] | None = None,
        feature: str = "entropy_mean",
    ):
        super().__init__(observation_names, bits)
        self.feature = feature
        self.col = self.column(feature)
        self.thresholds = _check_thresholds(
            default_thresholds(len(self.bits)) if thresholds is None else thresholds, len(self.bits)
        )
        # Class k (k-th cheapest setting, envs.settings.settings_by_cost) -> action index in the env's
        # (possibly unsorted) bits. With layer groups every group gets the block's one choice.
        self._class_to_action = np.asarray(settings_by_cost(self.bits), dtype=np.int64)

    def classes(self, values: np.ndarray) -> np.ndarray:
        """Rank of the chosen width among the ascending bits (0 = fewest bits)."""
        return np.searchsorted(np.asarray(self.thresholds), np.asarray(values, np.float64), side="right")

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return self._class_to_action[self.classes(obs2d[:, self.col])]

    def chosen_bits(self, values: np.ndarray) -> np.ndarray:
        """Bit-widths the rule picks for raw feature values (handy for calibration and labelling); a
        (key_bits, value_bits) setting counts its mean bits (K4V2: 3.0)."""
        ordered = [self.bits[i] for i in self._class_to_action]
        return np.asarray([mean_bits(b) if isinstance(b, tuple) else b for b in ordered])[self.classes(values)]

    # ------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write feature, bits and thresholds as YAML (atomically)."""
        bits = [list(b) if isinstance(b, tuple) else b for b in self.bits]
        doc = {"feature": self.feature, "bits": bits, "thresholds": list(self.thresholds)}

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                yaml.safe_dump(doc, f, sort_keys=False)

        return atomic_write(path, write)

    @classmethod
    def load(
        cls, path: str | os.PathLike, observation_names: Sequence[str], bits: Sequence[int]
    ) -> EntropyRulePolicy:
        """Rebuild a saved rule; its bits must equal the env's (thresholds mean nothing for other widths)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"rule thresholds file {path} not found; write one with EntropyRulePolicy.save"
            )
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or "thresholds" not in doc:
            raise ValueError(
                f"{path} is not a rule file: expected a mapping with 'thresholds' (and 'bits', 'feature')"
            )
        saved_bits = normalize_menu(doc.get("bits", bits))
        if saved_bits != normalize_menu(bits):
            raise ValueError(f"{path} was calibrated for bits {saved_bits} but the env uses {tuple(bits)}")
        return cls(observation_names, bits, doc["thresholds"], doc.get("feature", "entropy_mean"))
