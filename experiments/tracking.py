"""Weights & Biases runs, offline by default.

Experiments run on machines without network or a wandb account, so a run is written to disk
(``WANDB_MODE=offline``) unless the user chose otherwise; ``wandb sync <dir>`` uploads it later.
``WANDB_MODE=disabled`` turns logging off entirely (tests use it or offline mode in a tmp dir).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import wandb

from experiments.report import columns  # the one definition of the comparison's columns

_SCALARS = ("acc", "acc_norm", "loglik_delta", "avg_bits", "kv_bytes", "kv_ratio", "ms_per_item", "ms_per_token")


def init_run(*, project: str = "kvgym", group: str | None = None, name: str, config: Any,
             job_type: str, dir: str | Path = "runs") -> Any:
    """Start a wandb run recording the resolved ``config`` (a dict or a config dataclass)."""
    # Passed explicitly too: wandb caches its settings at the first init of a process, so a later
    # change of WANDB_MODE (e.g. to "disabled") would otherwise be ignored.
    mode = os.environ.setdefault("WANDB_MODE", "offline")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        from experiments.config import config_to_dict

        config = config_to_dict(config)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    # finish_previous: scripts open one run per policy in a loop; a forgotten finish must not nest runs.
    return wandb.init(project=project, group=group, name=name, config=dict(config), job_type=job_type,
                      dir=str(dir), mode=mode, reinit="finish_previous", settings=wandb.Settings(console="off"))


def log_summary_table(run: Any, policies: dict[str, dict], references: Sequence[str]) -> None:
    """One ``wandb.Table`` row per policy with the report's columns (intervals as ``key``, ``key_lo``,
    ``key_hi``), plus ``<policy>/<metric>`` run-summary scalars.

    With a single policy (the usual one-run-per-policy layout) the scalars are also stored
    unprefixed, so runs of a group can be compared column by column in the wandb UI.
    """
    cols = columns(references)
    names = ["policy", *(k for c in cols for k in c.keys())]
    data = [[name, *(v for c in cols for v in c.numbers(entry))] for name, entry in policies.items()]
    run.log({"summary_table": wandb.Table(columns=names, data=data)})
    for name, entry in policies.items():
        scalars = {key: entry["summary"][key]["mean"] for key in _SCALARS}
        scalars["items"] = entry["summary"]["items"]
        for ref in references:
            diff = entry.get("paired", {}).get(ref)
            if diff:
                scalars[f"d_acc_norm_vs_{ref}"] = diff["acc_norm"]["mean"]
        run.summary.update({f"{name}/{k}": v for k, v in scalars.items()})
        if len(policies) == 1:
            run.summary.update(scalars)


def define_curve(run: Any, prefix: str, step: str) -> None:
    """Plot every ``<prefix>/*`` metric against ``<prefix>/<step>`` (e.g. env steps) rather than wandb's own
    step counter, which other writers to the run (SB3's synced TensorBoard scalars) advance too."""
    run.define_metric(f"{prefix}/{step}")
    run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/{step}")


def log_curve(run: Any, prefix: str, row: Mapping[str, float | int | None]) -> None:
    """One point of a curve declared by :func:`define_curve`; missing (None) and NaN values are left out,
    so a metric that was not measured in an interval leaves a gap rather than a fake zero."""
    run.log({f"{prefix}/{k}": v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))})


def sync_hint(run: Any) -> str | None:
    """The command that uploads an offline run later; None when there is nothing to sync."""
    if getattr(run, "disabled", False) or not getattr(run, "offline", False):
        return None
    return f"wandb sync {Path(run.dir).parent}"


def finish(run: Any, announce: bool = False) -> str | None:
    """Finish the run and return its :func:`sync_hint` (computed first: the run is closed after);
    ``announce`` also prints it, so every script tells the user how to upload its offline run."""
    hint = sync_hint(run)
    run.finish()
    if announce and hint:
        print(f"wandb run saved offline; upload with: {hint}")
    return hint
