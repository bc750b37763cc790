"""Fit the token selector (agents.token_select) on pool episodes: which tokens to keep at ``protect_bits``.

    python -m experiments.train_selector --config experiments/configs/passkey_select.yaml

For ``items`` pool rows (from ``offset`` in the train split's order) the episode is rolled out at the
selector's block setting with nothing marked (``agents.rollout.rollout``: the observations a policy sees
at each block, token features included), and each token is labelled with the task's privileged evidence
(``KVPrecisionEnv.evidence_tokens``). :func:`agents.token_select.fit_selector` fits the logistic model;
``<out_dir>/selector.json`` is the policy (``select:<out_dir>/selector.json``), with how well it finds the
evidence on the fitting rows and on ``check_items`` other pool rows (precision, recall) in its ``info``
and in ``fit.json``. The env must have ``token_features`` and ``protect_bits`` and be on the train split:
held-out items are never fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.fixed import FixedBitsPolicy
from agents.rollout import rollout
from agents.token_select import TAIL_FEATURES, TokenSelector, fit_selector, token_columns
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from envs.settings import Setting, mean_bits, parse_setting, setting_name
from experiments import tracking
from experiments.config import parse_config, save_config
from experiments.io import write_json

SELECTOR_NAME = "selector.json"


@dataclass
class TrainSelectorConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # needs token_features, protect_bits and split "train"
    items: int = 120  # pool rows to fit on
    offset: int = 0  # first of them in the train split's order (rows before it are left for checks/probes)
    check_items: int = 24  # further pool rows (after the fitting ones) to measure precision and recall on
    window: int = 8  # token slots each side whose mean values the selector also reads
    keep_ratio: float = 1.0  # tokens kept per episode / evidence tokens per episode, on the fitting rows
    setting: str | None = None  # every block's setting ("2", "k3v2"); None: the menu's cheapest
    tail_tokens: int = 0  # also mark the prompt's last this many tokens (a prior, not fitted; agents.token_select)
    threads: int | None = 1  # torch CPU threads
    out_dir: str = "runs/train_selector"
    wandb_project: str = "kvgym"
    wandb_group: str | None = None
    progress: bool = True


def episode_data(env: KVPrecisionEnv, policy, row: int, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One pool episode: ``[blocks, F, S]`` per-token values as observed, ``[blocks, S]`` labels (1 evidence,
    0 other, -1 past the block's end)."""
    episode = rollout(env, policy, options={"row": row})
    columns, slots = token_columns(env.observation_names, features)
    values = np.stack([obs[columns].reshape(len(features), slots) for obs in episode.observations])
    evidence = env.evidence_tokens()
    labels = np.full((len(values), slots), -1.0, dtype=np.float32)
    for b, (start, end) in enumerate(env.block_spans()):
        labels[b, : end - start] = evidence[start:end]
    return values, labels


def found(selector: TokenSelector, data: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Precision, recall and tokens marked per episode of ``selector`` on episodes ``data``."""
    picked = hit = evidence = 0.0
    for values, labels in data:
        marks = (selector.scores(values) > selector.threshold) & (labels >= 0)
        picked += marks.sum()
        hit += (marks & (labels == 1)).sum()
        evidence += (labels == 1).sum()
    return {"precision": hit / max(picked, 1), "recall": hit / max(evidence, 1),
            "marked_per_episode": picked / max(len(data), 1), "evidence_per_episode": evidence / max(len(data), 1)}


def _setting_and_rows(env: KVPrecisionEnv, cfg: TrainSelectorConfig) -> tuple[Setting, list[int]]:
    """The blocks' setting and the pool rows to roll out (fitting rows, then check rows), checked."""
    setting = parse_setting(cfg.setting) if cfg.setting else min(env.bits, key=mean_bits)
    if setting not in env.bits:
        raise ValueError(f"setting {cfg.setting!r} is not in the env's menu {[setting_name(b) for b in env.bits]}")
    needed = cfg.items + cfg.check_items
    rows = [item.row for item in env.items[cfg.offset : cfg.offset + needed]]
    if len(rows) < needed:
        raise ValueError(f"the pool has {len(env.items)} items; offset + items + check_items needs {cfg.offset + needed}")
    return setting, rows


def run(cfg: TrainSelectorConfig) -> dict[str, Path]:
    """Roll out, label, fit and save; returns the paths written."""
    if cfg.env.split != "train":
        raise ValueError(f"train_selector fits on pool items only; env.split must be 'train', got {cfg.env.split!r}")
    if not cfg.env.token_features or cfg.env.protect_bits is None:
        raise ValueError("train_selector needs an env with token_features (what it reads) and protect_bits (what it marks)")
    last_block, rank = TAIL_FEATURES
    if cfg.tail_tokens and (last_block not in cfg.env.features or rank not in cfg.env.token_features):
        raise ValueError(f"tail_tokens needs {last_block} among env.features and {rank} among env.token_features "
                         "(how the policy finds the prompt's last tokens)")
    if cfg.items < 1 or cfg.offset < 0 or cfg.check_items < 0:
        raise ValueError(f"items must be >= 1 and offset, check_items >= 0; got {cfg.items}, {cfg.offset}, {cfg.check_items}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    env = KVPrecisionEnv(cfg.env)
    try:
        setting, rows = _setting_and_rows(env, cfg)
    except ValueError:
        env.close()
        raise
    out_dir = Path(cfg.out_dir)
    paths = {"config": save_config(cfg, out_dir / "config.yaml")}
    policy = FixedBitsPolicy(env.observation_names, env.bits, setting)
    policy.set_protect_slots(cfg.env.interval)
    wb = tracking.init_run(project=cfg.wandb_project, group=cfg.wandb_group, name="train_selector", config=cfg,
                           job_type="train", dir=out_dir)
    try:
        data = [episode_data(env, policy, row, cfg.env.token_features)
                for row in tqdm(rows, desc="pool episodes", disable=not cfg.progress)]
        fit, check = data[: cfg.items], data[cfg.items :]
        selector = fit_selector([v for v, _ in fit], [lab for _, lab in fit], cfg.env.token_features, setting,
                                cfg.window, cfg.keep_ratio, cfg.tail_tokens)
        report = {"fit_rows": rows[: cfg.items], "check_rows": rows[cfg.items :], "fit": found(selector, fit)}
        if check:
            report["check"] = found(selector, check)
        selector.info = {**(selector.info or {}), **{k: v for k, v in report.items() if not k.endswith("rows")}}
        paths["selector"] = selector.save(out_dir / SELECTOR_NAME)
        paths["fit"] = write_json(out_dir / "fit.json", {**report, "weights": dict(zip(
            [f"{f}{part}" for part in ("", "_near") for f in selector.features], selector.weights, strict=True))})
        wb.summary.update({f"{part}/{k}": v for part in ("fit", "check") if part in report
                           for k, v in report[part].items()})
        print(f"[train_selector] fit {report['fit']}" + (f"; check {report['check']}" if check else ""))
        print(f"[train_selector] selector -> {paths['selector']} (policy spec select:{paths['selector']})")
    finally:
        tracking.finish(wb, announce=True)
        env.close()
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    cfg, _ = parse_config(TrainSelectorConfig, argv, description=__doc__.split("\n\n")[0])
    return run(cfg)


if __name__ == "__main__":
    main()
