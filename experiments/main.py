"""The main job: collect -> train MLP -> train PPO -> evaluate -> report, on one shared env config.

    python -m experiments.main --config experiments/configs/main.yaml          # `make main`
    python -m experiments.main --config experiments/configs/study.yaml         # the real study

Each stage writes under ``out_dir/<stage>/`` and is skipped when its output already exists (set
``redo=true`` to run everything again), so an interrupted job picks up where it stopped; the
evaluation also resumes item by item. All stages share ``env`` (the train split for collection
and PPO, the held-out split for evaluation) and one wandb group, so every run of the job sits
side by side.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from envs.kv_precision import EnvConfig
from experiments import collect, evaluate, report, train_mlp, train_ppo
from experiments.config import parse_config, save_config

STAGES = ("collect", "train_mlp", "train_ppo", "evaluate", "report")


@dataclass
class MainConfig:
    out_dir: str = "runs/main"
    env: EnvConfig = field(default_factory=EnvConfig)  # shared by every stage (split is set per stage)
    ppo_rewards: dict | None = None  # reward terms for PPO training; None = env.rewards
    collect: collect.CollectConfig = field(default_factory=collect.CollectConfig)
    train_mlp: train_mlp.TrainMLPConfig = field(default_factory=train_mlp.TrainMLPConfig)
    train_ppo: train_ppo.TrainPPOConfig = field(default_factory=train_ppo.TrainPPOConfig)
    evaluate: evaluate.EvaluateConfig = field(default_factory=evaluate.EvaluateConfig)
    baselines: list[str] = field(
        default_factory=lambda: ["fp16", "fixed:2", "fixed:4", "fixed:8", "quanto:2", "quanto:4"]
    )
    stages: tuple[str, ...] = STAGES
    redo: bool = False
    wandb_group: str | None = None  # default: the out_dir name


def _env(cfg: MainConfig, split: str, rewards: dict | None = None) -> EnvConfig:
    return dataclasses.replace(cfg.env, split=split, rewards=dict(rewards or cfg.env.rewards))


def run(cfg: MainConfig) -> dict[str, str]:
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    group = cfg.wandb_group or out.name
    paths: dict[str, str] = {}
    started = time.perf_counter()

    def stage(name: str, done: Path) -> bool:
        if name not in cfg.stages:
            return False
        if done.exists() and not cfg.redo:
            print(f"[main] {name}: {done} exists, skipping (redo=true to run again)")
            return False
        print(f"[main] {name} ({time.perf_counter() - started:.0f} s into the job)")
        return True

    # resume=True in both: a re-run of an interrupted job continues the CSV / the PPO checkpoints.
    col = dataclasses.replace(
        cfg.collect, env=_env(cfg, "train"), out_dir=str(out / "collect"), wandb_group=group, resume=True
    )
    csv = Path(col.out_dir) / collect.CSV_NAME
    thresholds = Path(col.out_dir) / collect.THRESHOLDS_NAME
    if stage("collect", csv):
        collect.run(col)
    paths["csv"] = str(csv)

    mlp = dataclasses.replace(
        cfg.train_mlp, csv=str(csv), bits=cfg.env.bits, out_dir=str(out / "train_mlp"), wandb_group=group
    )
    mlp_path = Path(mlp.out_dir) / train_mlp.MODEL_NAME
    if stage("train_mlp", mlp_path):
        train_mlp.run(mlp)
    paths["mlp"] = str(mlp_path)

    ppo = dataclasses.replace(
        cfg.train_ppo, env=_env(cfg, "train", cfg.ppo_rewards), out_dir=str(out / "train_ppo"), wandb_group=group,
        resume=True,
    )
    ppo_path = Path(ppo.out_dir) / f"{ppo.algo.lower()}.zip"
    if stage("train_ppo", ppo_path):
        train_ppo.run(ppo)
    paths["ppo"] = str(ppo_path)

    policies = list(cfg.baselines)
    policies.append(f"rule:{thresholds}" if thresholds.exists() else "rule")
    if mlp_path.exists():
        policies.append(f"mlp:{mlp_path}")
    if ppo_path.exists():
        policies.append(f"sb3:{ppo.algo}:{ppo_path}")
    ev = dataclasses.replace(
        cfg.evaluate, env=_env(cfg, "eval"), policies=policies, out_dir=str(out / "evaluate"), wandb_group=group
    )
    summary = Path(ev.out_dir) / "summary.json"
    if "evaluate" in cfg.stages:  # always called: it resumes by itself and skips finished episodes
        print(f"[main] evaluate ({time.perf_counter() - started:.0f} s into the job)")
        evaluate.run(ev)
    paths["summary"] = str(summary)

    if "report" in cfg.stages and summary.exists():
        report.main([str(summary), "--out", str(out)])
        paths["report"] = str(out / "report.md")
    print(f"[main] done in {time.perf_counter() - started:.0f} s; outputs in {out}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(MainConfig, argv, description=__doc__.split("\n\n")[0])
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
