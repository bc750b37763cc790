"""A learned token selector: inside every block, mark the tokens to keep at the env's ``protect_bits``.

Why per token (issue 15): on the pass-key task one sentence of a ~1k-token prompt carries the answer.
Keeping the *blocks* that hold it precise costs a whole block of bits per needle; keeping only its
*tokens* precise costs a few dozen tokens' worth and recovers as much (measured on pool items,
``results/passkey_study/protect_tokens/``). A block-level controller cannot express that; this policy
does, on an env with ``protect_bits`` (the action: the block's setting, then one 0/1 mark per token).

The model: logistic regression over each token's per-token features (the env's ``token_features``,
observed token by token as ``digits@0 .. digits@63``) and their means over a window of ``window``
slots on each side within the block (a number's digits sit among other digits; a pass-key sentence is
capitalised). It is fitted by :func:`fit_selector` (``experiments.train_selector``) on *pool* episodes
to predict the privileged label "this token overlaps the task's evidence" (``KVPrecisionEnv.evidence_tokens``:
learning by cheating, as the MLP learns the evidence teacher's block labels), so at evaluation it reads
only what any policy sees. The threshold keeps, on the fitting episodes, ``keep_ratio`` times as many
tokens per episode as the evidence holds. The block's setting is one fixed menu entry (``setting``):
the selector decides *where* precision goes, the env's budget how much (it drops the latest marks
that do not fit).

``tail_tokens`` also marks the prompt's last N tokens, whatever they hold: there the question names
what to retrieve, and every ending attends to it. KIVI keeps its most recent tokens in full precision
for the same reason. Measured on pool rows 0-47 of the pass-key study (rotated keys, budget 2.5): the
last 32 tokens marked at 4 bits add +0.14 nats of gold log-likelihood and +6 pt of accuracy to the
selector (``results/passkey_study/README.md``, section 12). It is a fixed prior, like the sink tokens, not
a learned part; the policy finds the last block by ``blocks_left`` (0 there) and the block's tokens by
``token_rank`` (0 in padded slots; a real token is 0 only if its id is 0), so the env must observe both.

Saved as JSON (``select:<path.json>``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.base import Policy
from envs.io import atomic_write
from envs.settings import normalize_setting, setting_name

__all__ = ["TAIL_FEATURES", "TokenSelector", "TokenSelectPolicy", "fit_selector", "token_columns", "window_features"]

#: what ``tail_tokens`` reads: the state feature that is 0 at the prompt's last block, and the token feature
#: that is 0 only in a block's padded slots
TAIL_FEATURES: tuple[str, str] = ("blocks_left", "token_rank")


def token_columns(observation_names: Sequence[str], features: Sequence[str]) -> tuple[list[int], int]:
    """Observation indices of ``features`` token by token (feature-major: ``f@0 .. f@S-1`` per feature) and
    the slot count S; a ValueError names what is missing."""
    names = list(observation_names)
    columns, slots = [], None
    for f in features:
        found = [i for i, n in enumerate(names) if n.startswith(f"{f}@")]
        if not found:
            raise ValueError(
                f"the selector reads token feature {f!r}, but the env observes no '{f}@i' entries; add it to the "
                "env's token_features"
            )
        order = sorted(found, key=lambda i: int(names[i].split("@", 1)[1]))
        if slots is not None and len(order) != slots:
            raise ValueError(f"token feature {f!r} has {len(order)} slots, the others {slots}")
        slots = len(order)
        columns.extend(order)
    return columns, int(slots or 0)


def window_features(values: np.ndarray, window: int) -> np.ndarray:
    """``[n, F, S]`` per-token values -> ``[n, S, 2F]``: each token's values, then their means over the
    slots within ``window`` of it (clipped to the block's slots; padded slots count as zeros)."""
    n, f, s = values.shape
    csum = np.concatenate([np.zeros((n, f, 1)), np.cumsum(values, axis=2)], axis=2)
    idx = np.arange(s)
    lo, hi = np.maximum(idx - window, 0), np.minimum(idx + window + 1, s)
    near = (csum[:, :, hi] - csum[:, :, lo]) / (hi - lo)
    return np.concatenate([values, near], axis=1).transpose(0, 2, 1).astype(np.float32)


@dataclass
class TokenSelector:
    """The fitted selector: which token features it reads, how it scores them, the setting of every block."""

    features: list[str]
    window: int
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    threshold: float
    setting: str  # the block's setting, as envs.settings names it ("2", "k3v2")
    tail_tokens: int = 0  # also mark the prompt's last this many tokens (the question); see the module docstring
    info: dict[str, Any] | None = None  # how it was fitted (episodes, precision, recall): not read back

    def scores(self, values: np.ndarray) -> np.ndarray:
        """``[n, F, S]`` per-token values -> ``[n, S]`` logits (higher: more likely evidence)."""
        x = window_features(values, self.window)
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)) @ np.asarray(self.weights) + self.bias

    def save(self, path: str | os.PathLike) -> Path:
        text = json.dumps(asdict(self), indent=1) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenSelector:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"token selector {path} not found; fit one with experiments.train_selector")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            selector = cls(**doc)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a token selector written by TokenSelector.save ({e})") from None
        width = 2 * len(selector.features)
        if isinstance(selector.tail_tokens, bool) or not isinstance(selector.tail_tokens, int) or selector.tail_tokens < 0:
            raise ValueError(f"{path}: tail_tokens must be an integer >= 0, got {selector.tail_tokens!r}")
        if not (len(selector.mean) == len(selector.std) == len(selector.weights) == width):
            raise ValueError(f"{path}: mean/std/weights need {width} entries (2 per feature)")
        return selector


def fit_selector(
    values: Sequence[np.ndarray], labels: Sequence[np.ndarray], features: Sequence[str], setting: Any,
    window: int = 8, keep_ratio: float = 1.0, tail_tokens: int = 0,
) -> TokenSelector:
    """Fit the selector on episodes: ``values[e]`` ``[blocks, F, S]`` per-token values of episode e's blocks,
    ``labels[e]`` ``[blocks, S]``: 1 for an evidence token, 0 for another token, -1 for a slot past the
    block's end (left out of the fit and of the threshold).

    Logistic regression (L-BFGS, standardised inputs); the threshold keeps ``keep_ratio`` x the evidence
    tokens per episode, on these episodes. ``tail_tokens`` is stored as given (a prior, not fitted)."""
    if not values or len(values) != len(labels):
        raise ValueError(f"need one label array per episode and at least one episode, got {len(values)} and {len(labels)}")
    if keep_ratio <= 0:
        raise ValueError(f"keep_ratio must be > 0, got {keep_ratio}")
    if tail_tokens < 0:
        raise ValueError(f"tail_tokens must be >= 0, got {tail_tokens}")
    xs, ys = [], []
    for v, lab in zip(values, labels, strict=True):
        x = window_features(np.asarray(v, dtype=np.float64), window)
        x, lab = x.reshape(-1, x.shape[-1]), np.asarray(lab, dtype=np.float32).reshape(-1)
        if len(lab) != len(x):
            raise ValueError(f"labels of shape {np.shape(lab)} do not match values of shape {np.shape(v)}")
        xs.append(x[lab >= 0])
        ys.append(lab[lab >= 0])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if y.sum() == 0:
        raise ValueError("no evidence token among the fitting episodes: the task has no evidence to learn")
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor(y)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        scores = (xt @ w + b).numpy()
    keep = min(len(scores) - 1, int(round(keep_ratio * y.sum())))
    threshold = float(np.sort(scores)[::-1][keep])
    picked = scores > threshold
    info = {
        "episodes": len(values), "tokens": int(len(y)), "evidence_tokens": int(y.sum()),
        "picked_tokens": int(picked.sum()), "precision": float((picked * y).sum() / max(picked.sum(), 1)),
        "recall": float((picked * y).sum() / y.sum()), "keep_ratio": keep_ratio,
    }
    return TokenSelector(
        list(features), int(window), mean.tolist(), std.tolist(), w.detach().tolist(), float(b.item()), threshold,
        setting_name(normalize_setting(setting)), tail_tokens=int(tail_tokens), info=info,
    )


class TokenSelectPolicy(Policy):
    """Every block at the selector's setting; the tokens it scores above its threshold marked (``select:<path>``),
    and with ``tail_tokens`` the prompt's last tokens too."""

    name = "select"

    def __init__(self, observation_names: Sequence[str], bits: Sequence[Any], path: str | os.PathLike):
        super().__init__(observation_names, bits)
        self.selector = TokenSelector.load(path)
        self.columns, self.slots = token_columns(self.observation_names, self.selector.features)
        setting = normalize_setting(self.selector.setting)
        if setting not in self.bits:
            raise ValueError(
                f"{path}: the selector commits blocks at {self.selector.setting}, which the env's menu "
                f"{[setting_name(b) for b in self.bits]} does not offer; add it to the env's bits"
            )
        self.setting_index = self.bits.index(setting)
        if self.selector.tail_tokens:
            last_block, rank = TAIL_FEATURES
            missing = [f for f, name in ((last_block, last_block), (rank, f"{rank}@0"))
                       if name not in self.observation_names]
            if missing:
                raise ValueError(
                    f"{path}: tail_tokens={self.selector.tail_tokens} finds the prompt's last block by the "
                    "'blocks_left' feature and its tokens by the 'token_rank' token feature; the env does not "
                    f"observe {missing}: add blocks_left to its features and token_rank to its token_features"
                )
            self.last_block_column = self.observation_names.index(last_block)
            self.rank_columns, _ = token_columns(self.observation_names, [rank])

    def _tail_marks(self, obs2d: np.ndarray) -> np.ndarray:
        """``[n, slots]``: 1 on the last ``tail_tokens`` tokens of the prompt's last block (``blocks_left`` 0);
        the block's tokens end at its last slot with a nonzero ``token_rank`` (padded slots are 0)."""
        marks = np.zeros((len(obs2d), self.slots), np.int64)
        for i in np.flatnonzero(obs2d[:, self.last_block_column] <= 0):
            filled = np.flatnonzero(obs2d[i, self.rank_columns] > 0)
            end = int(filled[-1]) + 1 if len(filled) else 0
            marks[i, max(end - self.selector.tail_tokens, 0) : end] = 1
        return marks

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        if self.protect_slots != self.slots:
            raise ValueError(
                f"{self.name!r} marks tokens in {self.slots} slots; run it on an env with protect_bits and "
                f"interval {self.slots} (this env has {self.protect_slots} slots)"
            )
        values = obs2d[:, self.columns].reshape(len(obs2d), len(self.selector.features), self.slots)
        marks = (self.selector.scores(values) > self.selector.threshold).astype(np.int64)
        if self.selector.tail_tokens:
            marks |= self._tail_marks(obs2d)
        return np.concatenate([np.full((len(obs2d), 1), self.setting_index, np.int64), marks], axis=1)
