"""Train the MLP KV-precision controller on the rows collected from the entropy rule.

    python -m experiments.train_mlp --config experiments/configs/train_mlp.yaml

Wraps :func:`agents.mlp.train_controller` (2x128 ReLU, Adam, stratified 80/20 split, composite loss =
CE to the rule's labels + expected latency + token-accuracy regulariser). Writes ``<out_dir>/mlp.pt``
(load it with ``mlp:<out_dir>/mlp.pt``), ``confusion.json`` (validation confusion matrix, rows = rule,
cols = controller) and the resolved ``config.yaml``; per-epoch losses go to wandb.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wandb

from agents.mlp import (
    DEFAULT_BITS,
    DEFAULT_FEATURES,
    LABEL_COLUMNS,
    LossWeights,
    format_confusion,
    train_controller,
)
from envs.settings import Setting, setting_name
from experiments import tracking
from experiments.config import parse_config, save_config
from experiments.io import write_json

MODEL_NAME = "mlp.pt"
CONFUSION_NAME = "confusion.json"
#: collect CSV columns that are not observation entries: the episode keys and the labels
NON_OBSERVATION_COLUMNS = ("item", "block", *LABEL_COLUMNS)


@dataclass
class TrainMLPConfig:
    csv: str = "runs/collect/controller_training.csv"  # written by experiments.collect
    features: tuple[str, ...] = DEFAULT_FEATURES  # input columns (the seed's four features)
    bits: tuple[Setting, ...] = DEFAULT_BITS  # must match the env the controller will drive (ints or [k, v] pairs)
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    val_frac: float = 0.2
    loss: LossWeights = field(default_factory=LossWeights)  # ce / latency / accuracy weights
    seed: int = 0
    out_dir: str = "runs/train_mlp"
    wandb_project: str = "kvgym"
    wandb_group: str | None = None
    progress: bool = True


def unused_observations(csv_path: Path, features: Sequence[str]) -> list[str]:
    """The observation columns of a collect CSV that ``features`` leaves out (the controller never sees them)."""
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f), [])
    return [c for c in header if c not in (*features, *NON_OBSERVATION_COLUMNS)]


def run(cfg: TrainMLPConfig) -> dict[str, Path]:
    """Train, save the controller and its confusion matrix; returns the paths written."""
    csv_path = Path(cfg.csv)
    if not csv_path.is_file():  # before a wandb run is opened for nothing
        raise FileNotFoundError(
            f"controller training data {csv_path} not found; collect it first with "
            "`python -m experiments.collect` or point --set csv=PATH at an existing file"
        )
    unused = unused_observations(csv_path, cfg.features)
    if unused:  # a quiet default here once left a passkey controller blind to the needles (digits)
        print(f"[train_mlp] the controller reads {list(cfg.features)}; the CSV also holds {unused}, "
              "unused (list them in `features` to use them)")
    out_dir = Path(cfg.out_dir)
    paths = {"config": save_config(cfg, out_dir / "config.yaml")}
    wb = tracking.init_run(project=cfg.wandb_project, group=cfg.wandb_group, name="train_mlp", config=cfg,
                           job_type="train", dir=out_dir)
    try:
        result = train_controller(
            csv_path, out_dir / MODEL_NAME, features=cfg.features, bits=cfg.bits, epochs=cfg.epochs, lr=cfg.lr,
            batch_size=cfg.batch_size, weights=cfg.loss, val_frac=cfg.val_frac, seed=cfg.seed,
            progress=cfg.progress, log_fn=wb.log,
        )
        cm = np.asarray(result.confusion)
        confusion = {
            "bits": list(result.bits),
            "rows": "rule label",
            "cols": "controller prediction",
            "matrix": cm.tolist(),
            "val_accuracy": result.val_accuracy,
            "latency_per_class": result.latency_per_class,
            **result.extra,
            "final_epoch": result.history[-1] if result.history else {},
        }
        paths["model"] = result.path
        paths["confusion"] = write_json(out_dir / CONFUSION_NAME, confusion)
        table = wandb.Table(columns=["rule\\pred", *map(setting_name, result.bits)],
                            data=[[setting_name(b), *map(int, row)] for b, row in zip(result.bits, cm, strict=True)])
        wb.log({"confusion": table})
        wb.summary.update({"val_accuracy": result.val_accuracy, **result.extra})
        if not cfg.progress:  # train_controller printed it already otherwise
            print(format_confusion(cm, result.bits))
        print(f"val accuracy {result.val_accuracy:.3f}; controller -> {result.path}")
    finally:
        tracking.finish(wb, announce=True)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    cfg, _ = parse_config(TrainMLPConfig, argv, description=__doc__.split("\n\n")[0])
    return run(cfg)


if __name__ == "__main__":
    main()
