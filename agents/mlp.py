"""The supervised KV-precision controller: a small MLP distilled from the entropy rule, then nudged.

It learns from ``controller_training.csv`` (rows of block features labelled with the rule's bits) with a
composite loss: cross-entropy to the rule keeps it close to a policy known to be sane, an expected
latency term pulls it towards cheaper widths, and a token-accuracy term pulls it towards more bits on
blocks where the base model already predicts the next token badly. The last two act through the
predicted distribution, so the controller can depart from the rule where the data say it pays.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from agents.base import Policy
from envs.io import atomic_write
from envs.settings import normalize_menu

DEFAULT_FEATURES: tuple[str, ...] = ("entropy_mean", "rarity_mean", "attn_var_mean", "token_acc_mean")
DEFAULT_BITS: tuple[int, ...] = (2, 4, 8, 16)
#: Columns the loss needs besides the input features.
LABEL_COLUMNS: tuple[str, ...] = ("token_acc_mean", "latency_ms_per_token", "bits")
_FILE_KEYS = ("state_dict", "features", "mean", "std", "bits", "latency_per_class", "weights", "history")


class ControllerMLP(nn.Module):
    """d features -> 128 ReLU -> 128 ReLU -> one logit per bit-width (small enough to cost nothing per block)."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class ControllerRows:
    """The columns of controller_training.csv that training uses, as float arrays."""

    X: np.ndarray  # (n, d) input features, in ``features`` order
    y: np.ndarray  # (n,) class = index into ``bits`` of the rule's label
    token_acc: np.ndarray  # (n,) probability of the actual next token, in [0, 1]
    latency: np.ndarray  # (n,) ms per token of the step that produced the row
    features: tuple[str, ...]
    bits: tuple[int, ...]


def load_rows(
    csv_path: str | os.PathLike,
    features: Sequence[str] = DEFAULT_FEATURES,
    bits: Sequence[int] = DEFAULT_BITS,
) -> ControllerRows:
    """Read the training CSV (the columns experiments.collect writes); fails naming any missing column or unknown label."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"controller training data {path} not found; collect it first with `python -m experiments.collect`"
        )
    bits = tuple(int(b) for b in bits)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in dict.fromkeys([*features, *LABEL_COLUMNS]) if c not in header]
        if missing:
            raise ValueError(f"{path} lacks column(s) {missing}; it has {header}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has a header but no rows")

    def col(name: str) -> np.ndarray:
        try:
            return np.array([float(r[name]) for r in rows], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: column {name!r} has a non-numeric value ({e})") from None

    labels = col("bits").astype(int)
    unknown = sorted(set(labels.tolist()) - set(bits))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not among bits {bits}; pass the bits the data used")
    lookup = {b: i for i, b in enumerate(bits)}
    return ControllerRows(
        X=np.stack([col(c) for c in features], axis=1).astype(np.float32),
        y=np.array([lookup[b] for b in labels], dtype=np.int64),
        token_acc=col("token_acc_mean").astype(np.float32),
        latency=col("latency_ms_per_token").astype(np.float32),
        features=tuple(features),
        bits=bits,
    )


def latency_per_class(rows: ControllerRows) -> np.ndarray:
    """Mean measured ms/token for each bit-width; a width the rule never chose borrows the nearest measured one."""
    out = np.full(len(rows.bits), np.nan)
    for k in range(len(rows.bits)):
        if (rows.y == k).any():
            out[k] = float(rows.latency[rows.y == k].mean())
    seen = np.flatnonzero(~np.isnan(out))
    widths = np.asarray(rows.bits, dtype=np.float64)
    for k in np.flatnonzero(np.isnan(out)):
        out[k] = out[seen[np.argmin(np.abs(widths[seen] - widths[k]))]]
    return out


def stratified_split(y: np.ndarray, val_frac: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/val indices holding out ``val_frac`` of every class, so rare widths appear in both."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        n_val = int(round(val_frac * len(idx)))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)  # keep each class on both sides when possible
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ------------------------------------------------------------------------------------------------ loss
@dataclass
class LossWeights:
    """Weights of the composite loss. CE dominates by default: start from the rule, let the rest nudge."""

    ce: float = 1.0
    latency: float = 0.1
    accuracy: float = 0.1


def _weights(weights: LossWeights | dict[str, float] | None) -> LossWeights:
    if isinstance(weights, LossWeights):
        return weights
    unknown = sorted(set(weights or {}) - set(asdict(LossWeights())))
    if unknown:
        raise ValueError(f"unknown loss weight(s) {unknown}; known: {sorted(asdict(LossWeights()))}")
    return LossWeights(**{k: float(v) for k, v in (weights or {}).items()})


@dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    latency: torch.Tensor
    accuracy: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "ce", "latency", "accuracy")}


class CompositeLoss(nn.Module):
    """``w_ce·CE(rule label) + w_latency·E_p[latency] + w_accuracy·mean((1 - acc)·(1 - E_p[bits]/max_bits))``.

    - latency: ``latency_per_class`` (ms/token per width, measured during collection) divided by its max,
      so the term lies in [0, 1] and reads "fraction of the slowest width's cost".
    - accuracy: ``acc`` is the block's token accuracy (probability of the actual next token). The term is
      the shortfall of expected precision, weighted by how badly the model is doing, so its gradient raises
      ``E_p[bits]`` most where accuracy is low. The seed report's regulariser, ``1 - tokenAccuracy/100``,
      does not involve the model output at all: a constant with zero gradient, which could not change what
      was learned. Here the term goes through the softmax, so it does.
    """

    def __init__(
        self,
        latency_per_class: Sequence[float] | torch.Tensor,
        bits: Sequence[int],
        w_ce: float = 1.0,
        w_latency: float = 0.1,
        w_accuracy: float = 0.1,
    ):
        super().__init__()
        lat = torch.as_tensor(latency_per_class, dtype=torch.float32).reshape(-1)
        widths = torch.as_tensor(list(bits), dtype=torch.float32)
        if lat.numel() != widths.numel():
            raise ValueError(f"latency_per_class has {lat.numel()} entries for {widths.numel()} bit-widths")
        if not torch.isfinite(lat).all() or (lat < 0).any() or lat.max() <= 0:
            raise ValueError(
                f"latency_per_class must be finite, non-negative, not all zero; got {lat.tolist()}"
            )
        self.register_buffer("latency_norm", lat / lat.max())
        self.register_buffer("bits_norm", widths / widths.max())
        self.w_ce, self.w_latency, self.w_accuracy = float(w_ce), float(w_latency), float(w_accuracy)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, token_acc: torch.Tensor) -> LossTerms:
        p = torch.softmax(logits, dim=-1)
        ce = nn.functional.cross_entropy(logits, target)
        latency = (p @ self.latency_norm).mean()
        accuracy = ((1.0 - token_acc.clamp(0.0, 1.0)) * (1.0 - p @ self.bits_norm)).mean()
        total = self.w_ce * ce + self.w_latency * latency + self.w_accuracy * accuracy
        return LossTerms(total=total, ce=ce, latency=latency, accuracy=accuracy)


# -------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    path: Path
    features: tuple[str, ...]
    bits: tuple[int, ...]
    latency_per_class: list[float]
    history: list[dict[str, float]]
    confusion: np.ndarray  # rows = rule label, cols = predicted, on the val split
    val_accuracy: float
    extra: dict[str, Any] = field(default_factory=dict)


def format_confusion(cm: np.ndarray, bits: Sequence[int]) -> str:
    """Plain-text confusion matrix (rows = rule's bits, cols = predicted bits)."""
    head = "rule\\pred " + " ".join(f"{b:>6d}" for b in bits)
    lines = [head] + [
        f"{b:>9d} " + " ".join(f"{int(v):>6d}" for v in row) for b, row in zip(bits, cm, strict=True)
    ]
    return "\n".join(lines)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded: on a net this small, intra-op threads only add sync cost (10x slower
    on a busy 2-core machine), and the caller's own thread setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _evaluate(model: nn.Module, loss_fn: CompositeLoss, X, y, acc) -> tuple[dict[str, float], torch.Tensor]:
    model.eval()
    with torch.no_grad():
        logits = model(X)
        terms = loss_fn(logits, y, acc).floats()
    model.train()
    return terms, logits.argmax(-1)


def train_controller(
    csv_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    bits: Sequence[int] = DEFAULT_BITS,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    weights: LossWeights | dict[str, float] | None = None,
    val_frac: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    log_fn: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fit the controller on the CSV (Adam, stratified 80/20 split), save it to ``out_path``, report.

    ``log_fn`` gets one flat dict per epoch (``epoch``, ``train/<term>``, ``val/<term>``, ``val/acc``) so a
    caller can forward it to wandb. With ``progress`` a bar runs over epochs and the val confusion matrix
    is printed at the end.
    """
    w = _weights(weights)
    torch.manual_seed(seed)
    rows = load_rows(csv_path, features, bits)
    tr, va = stratified_split(rows.y, val_frac, seed)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"{csv_path}: too few rows ({len(rows.y)}) for a train/val split")
    mean = rows.X[tr].mean(axis=0)
    std = rows.X[tr].std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # a constant feature is left unscaled rather than blown up
    Xn = torch.from_numpy((rows.X - mean) / std).float()
    y = torch.from_numpy(rows.y)
    acc = torch.from_numpy(rows.token_acc)
    lat = latency_per_class(rows)

    model = ControllerMLP(len(rows.features), len(rows.bits))
    loss_fn = CompositeLoss(lat, rows.bits, w.ce, w.latency, w.accuracy)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    tr_t = torch.from_numpy(tr)
    history: list[dict[str, float]] = []

    bar = tqdm(range(1, epochs + 1), desc="train controller", disable=not progress)
    with _one_thread():
        for epoch in bar:
            sums: dict[str, float] = {}
            for batch in tr_t[torch.randperm(len(tr_t), generator=gen)].split(batch_size):
                terms = loss_fn(model(Xn[batch]), y[batch], acc[batch])
                opt.zero_grad()
                terms.total.backward()
                opt.step()
                for k, v in terms.floats().items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch)
            val_terms, val_pred = _evaluate(model, loss_fn, Xn[va], y[va], acc[va])
            record = {"epoch": float(epoch)}
            record.update({f"train/{k}": v / len(tr) for k, v in sums.items()})
            record.update({f"val/{k}": v for k, v in val_terms.items()})
            record["val/acc"] = float((val_pred == y[va]).float().mean())
            history.append(record)
            bar.set_postfix(loss=f"{record['train/total']:.3f}", val_acc=f"{record['val/acc']:.2f}")
            if log_fn is not None:
                log_fn(record)
        _, val_pred = _evaluate(model, loss_fn, Xn[va], y[va], acc[va])

    cm = np.zeros((len(rows.bits), len(rows.bits)), dtype=np.int64)
    np.add.at(cm, (rows.y[va], val_pred.numpy()), 1)
    if progress:
        print("val confusion matrix (rows = rule, cols = controller):\n" + format_confusion(cm, rows.bits))

    payload = {
        "state_dict": model.state_dict(),
        "features": list(rows.features),
        "mean": mean.astype(float).tolist(),
        "std": std.astype(float).tolist(),
        "bits": list(rows.bits),
        "latency_per_class": lat.astype(float).tolist(),
        "weights": asdict(w),
        "history": history,
    }
    path = atomic_write(out_path, lambda tmp: torch.save(payload, tmp))
    return TrainResult(
        path=path,
        features=rows.features,
        bits=rows.bits,
        latency_per_class=payload["latency_per_class"],
        history=history,
        confusion=cm,
        val_accuracy=float(np.trace(cm) / max(cm.sum(), 1)),
        extra={"n_train": int(len(tr)), "n_val": int(len(va))},
    )


# ---------------------------------------------------------------------------------------------- policy
def load_controller(path: str | os.PathLike) -> tuple[ControllerMLP, dict[str, Any]]:
    """The model and its metadata from a file written by :func:`train_controller`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MLP controller {path} not found; train one with `python -m experiments.train_mlp`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors vary by torch version
        raise ValueError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from None
    missing = [k for k in _FILE_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(
            f"{path} is not an MLP controller file (missing {missing}); train one with train_controller"
        )
    model = ControllerMLP(len(payload["features"]), len(payload["bits"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload


class MLPPolicy(Policy):
    """A trained controller read from ``path``: argmax of its logits, or a sample when not deterministic.

    It has one output class per menu entry (``(key_bits, value_bits)`` settings included) and chooses
    one per block for the whole model, so it refuses an env with ``layer_groups > 1``.
    """

    name = "mlp"
    supports_layer_groups = False
    layer_groups_hint = "its one output class per menu entry is one choice for every layer; use fixed, rule or ppo"

    def __init__(
        self, observation_names: Sequence[str], bits: Sequence[int], path: str | os.PathLike, seed: int = 0
    ):
        super().__init__(observation_names, bits)
        self.path = Path(path)
        self.model, meta = load_controller(self.path)
        saved_bits = normalize_menu(meta["bits"])
        if saved_bits != self.bits:
            raise ValueError(f"{self.path} was trained for bits {saved_bits} but the env uses {self.bits}")
        absent = [f for f in meta["features"] if f not in self.observation_names]
        if absent:
            raise ValueError(
                f"{self.path} needs features {absent} the env does not provide ({list(self.observation_names)})"
            )
        self.features = tuple(meta["features"])
        self.cols = np.array([self.column(f) for f in self.features])
        self.mean = np.asarray(meta["mean"], dtype=np.float32)
        self.std = np.asarray(meta["std"], dtype=np.float32)
        self._gen = torch.Generator().manual_seed(seed)

    def logits(self, obs2d: np.ndarray) -> torch.Tensor:
        x = (np.asarray(obs2d, dtype=np.float32)[:, self.cols] - self.mean) / self.std
        with torch.no_grad():
            return self.model(torch.from_numpy(x))

    def act(self, obs2d: np.ndarray, deterministic: bool = True) -> np.ndarray:
        logits = self.logits(obs2d)
        if deterministic:
            return logits.argmax(-1).numpy().astype(np.int64)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self._gen).squeeze(-1).numpy().astype(np.int64)
