"""The main job: collect -> train MLP -> train PPO -> search static -> evaluate -> report, on one shared env config.

    python -m experiments.main --config experiments/configs/main.yaml          # `make main`
    python -m experiments.main --config experiments/configs/study.yaml         # the real study

Each stage writes under ``out_dir/<stage>/`` and is skipped when its output already exists (set
``redo=true`` to run everything again), so an interrupted job picks up where it stopped; the
evaluation also resumes item by item.

One config is what runs. The top-level ``env`` is every stage's env; a stage that needs something
else (PPO's reward, say) names only the keys it changes under its own ``env:``, an overlay::

    env: {model: embedded, shots: 5, rewards: {loglik: 1.0, memory: 1.0}}
    train_ppo:
      env: {rewards: {ending_loglik: 1.0, final_budget: {weight: 40.0, target_bits: 2.9}}}

With ``env.bit_budget`` set, every stage runs under that budget: collect's rule, the MLP, PPO, the
static schedule search (``experiments.search_static`` on pool items; its schedule is evaluated as the
``static`` policy) and the evaluation of the learned policies (fixed-setting baselines run as their
names say, without the budget: see ``agents.fixed.fixed_env_overrides``).

Keys the job itself derives (each stage's ``out_dir``, ``wandb_group``, ``resume``, ``env.split``,
``train_mlp.csv``/``bits``, ``search_static.out``, ``evaluate.policies``) cannot be set in a stage: that is
an error naming where the setting belongs, never a value silently replaced. Without a budget (neither
``env.bit_budget`` nor ``search_static.bit_budget``) there is no static schedule to search: that stage
is skipped. The job saves the fully resolved config
(every stage as it ran, identical to the ``config.yaml`` each stage writes) as ``config.yaml``; a run
of some stages only writes ``config.<stages>.yaml`` beside it instead of overwriting the full record.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.kv_precision import EnvConfig
from experiments import collect, evaluate, report, search_static, train_mlp, train_ppo
from experiments.config import ConfigError, parse_config, save_config

STAGES = ("collect", "train_mlp", "train_ppo", "search_static", "evaluate", "report")
#: Stages whose config has an ``env`` (an overlay of the top-level one) and the split each runs on.
ENV_SPLITS = {"collect": "train", "train_ppo": "train", "search_static": "train", "evaluate": "eval"}
#: Per stage: the keys the job derives, and where a user sets what they stand for instead.
OWNED: dict[str, dict[str, str]] = {
    "collect": {"out_dir": "out_dir (top level)", "wandb_group": "wandb_group (top level)",
                "resume": "redo (top level): the job always resumes unless redo=true"},
    "train_mlp": {"out_dir": "out_dir (top level)", "wandb_group": "wandb_group (top level)",
                  "csv": "the collect stage (its output is the training data)", "bits": "env.bits (top level)"},
    "train_ppo": {"out_dir": "out_dir (top level)", "wandb_group": "wandb_group (top level)",
                  "resume": "redo (top level): the job always resumes unless redo=true"},
    "search_static": {"out": "out_dir (top level)"},
    "evaluate": {"out_dir": "out_dir (top level)", "wandb_group": "wandb_group (top level)",
                 "policies": "baselines (top level); the job adds the rule, MLP, PPO and static schedule it made"},
}


@dataclass
class MainConfig:
    out_dir: str = "runs/main"
    env: EnvConfig = field(default_factory=EnvConfig)  # every stage's env; a stage's env: overlays it
    collect: collect.CollectConfig = field(default_factory=collect.CollectConfig)
    train_mlp: train_mlp.TrainMLPConfig = field(default_factory=train_mlp.TrainMLPConfig)
    train_ppo: train_ppo.TrainPPOConfig = field(default_factory=train_ppo.TrainPPOConfig)
    search_static: search_static.SearchStaticConfig = field(default_factory=search_static.SearchStaticConfig)
    evaluate: evaluate.EvaluateConfig = field(default_factory=evaluate.EvaluateConfig)
    baselines: list[str] = field(default_factory=lambda: ["fp16", "fixed:2", "fixed:4", "fixed:8", "quanto:4"])
    stages: tuple[str, ...] = STAGES
    redo: bool = False
    wandb_group: str | None = None  # default: the out_dir name


class _StageOverlay:
    """The ``prepare`` hook of :func:`parse_config`: turns each stage's ``env:`` into the top-level env
    plus that overlay (in the raw mapping, so the typed config is the resolved one) and remembers which
    derived keys the user wrote, to check them once the job has derived their values."""

    def __init__(self) -> None:
        self.explicit: set[tuple[str, str]] = set()

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        top_env = data.get("env") or {}
        if isinstance(top_env, dict) and str(top_env.get("split", "train")) != "train":  # "train": a saved record
            raise ConfigError("env.split is set by the job per stage (train for collect, train_ppo and "
                              "search_static, eval for evaluate); remove it")
        for stage in STAGES:
            section = data.setdefault(stage, {}) if stage in ENV_SPLITS else data.get(stage)
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ConfigError(f"config section '{stage}' must be a mapping, got {section!r}")
            self.explicit |= {(stage, key) for key in OWNED.get(stage, {}) if key in section}
            if "env" in section and stage not in ENV_SPLITS:
                raise ConfigError(f"'{stage}' has no env of its own; set env (top level)")
            overlay = section.get("env") or {}
            if stage in ENV_SPLITS:
                if not isinstance(overlay, dict):
                    raise ConfigError(f"'{stage}.env' must be a mapping of the env keys it changes, got {overlay!r}")
                self.explicit |= {(stage, "env.split")} if "split" in overlay else set()
                section["env"] = {**(top_env if isinstance(top_env, dict) else {}), **overlay}
        return data

    def check(self, given: MainConfig, resolved: MainConfig) -> None:
        """A derived key the user set is an error unless it already holds the derived value (a saved
        record re-run as it is): otherwise it would be silently replaced."""
        for stage, key in sorted(self.explicit):
            if key == "env.split":
                mine, theirs = getattr(given, stage).env.split, getattr(resolved, stage).env.split
                where = f"nowhere: the job runs {stage} on the {theirs} split"
            else:
                mine, theirs = getattr(getattr(given, stage), key), getattr(getattr(resolved, stage), key)
                where = OWNED[stage][key]
            if _plain(mine) != _plain(theirs):
                raise ConfigError(f"'{stage}.{key}' is set by the main job ({theirs!r}), so {mine!r} would be "
                                  f"ignored; set it in {where}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _stage_env(cfg: MainConfig, stage: str) -> EnvConfig:
    return dataclasses.replace(getattr(cfg, stage).env, split=ENV_SPLITS[stage])


def resolve(cfg: MainConfig) -> MainConfig:
    """Every stage's config exactly as the job runs it: derived paths, group, splits and policies filled in.

    The evaluated policies are decided here, from what exists or will be trained by this run, so the
    saved record names them before any stage starts.
    """
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    out = Path(cfg.out_dir)
    group = cfg.wandb_group or out.name
    col = dataclasses.replace(cfg.collect, env=_stage_env(cfg, "collect"), out_dir=str(out / "collect"),
                              wandb_group=group, resume=not cfg.redo)
    csv = Path(col.out_dir) / collect.CSV_NAME
    mlp = dataclasses.replace(cfg.train_mlp, csv=str(csv), bits=tuple(cfg.env.bits), out_dir=str(out / "train_mlp"),
                              wandb_group=group)
    ppo = dataclasses.replace(cfg.train_ppo, env=_stage_env(cfg, "train_ppo"), out_dir=str(out / "train_ppo"),
                              wandb_group=group, resume=not cfg.redo)
    static = dataclasses.replace(cfg.search_static, env=_stage_env(cfg, "search_static"),
                                 out=str(out / "search_static" / SCHEDULE_NAME))

    def planned(stage: str, path: Path) -> bool:
        return stage in cfg.stages or path.exists()

    thresholds = Path(col.out_dir) / collect.THRESHOLDS_NAME
    calibrates = cfg.collect.calibrate_target_bits is not None
    policies = list(cfg.baselines)
    policies.append(f"rule:{thresholds}" if calibrates and planned("collect", thresholds) else "rule")
    if planned("train_mlp", mlp_path(mlp)):
        policies.append(f"mlp:{mlp_path(mlp)}")
    if planned("train_ppo", ppo_path(ppo)):
        policies.append(f"sb3:{ppo.algo}:{ppo_path(ppo)}")
    if planned("search_static", Path(static.out)) and has_budget(static):
        policies.append(f"static:{static.out}")
    ev = dataclasses.replace(cfg.evaluate, env=_stage_env(cfg, "evaluate"), policies=policies,
                             out_dir=str(out / "evaluate"), wandb_group=group)
    return dataclasses.replace(cfg, collect=col, train_mlp=mlp, train_ppo=ppo, search_static=static, evaluate=ev,
                               wandb_group=group)


#: The static schedule's file under ``out_dir/search_static/`` (evaluated as ``static:<it>``).
SCHEDULE_NAME = "schedule.json"


def has_budget(cfg: search_static.SearchStaticConfig) -> bool:
    """Whether the static schedule search has a budget to search under (it needs one)."""
    return cfg.bit_budget is not None or cfg.env.bit_budget is not None


def mlp_path(cfg: train_mlp.TrainMLPConfig) -> Path:
    return Path(cfg.out_dir) / train_mlp.MODEL_NAME


def ppo_path(cfg: train_ppo.TrainPPOConfig) -> Path:
    return Path(cfg.out_dir) / f"{cfg.algo.lower()}.zip"


def record_name(stages: Sequence[str]) -> str:
    """``config.yaml`` for the whole job; a run of some stages keeps its own record."""
    return "config.yaml" if tuple(stages) == STAGES else f"config.{'+'.join(stages)}.yaml"


def run(cfg: MainConfig) -> dict[str, str]:
    """Run the stages of ``cfg`` (resolved first; a resolved config passes through unchanged)."""
    cfg = resolve(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / record_name(cfg.stages))
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

    csv = Path(cfg.train_mlp.csv)
    if stage("collect", csv):
        collect.run(cfg.collect)
    paths["csv"] = str(csv)
    if stage("train_mlp", mlp_path(cfg.train_mlp)):
        train_mlp.run(cfg.train_mlp)
    paths["mlp"] = str(mlp_path(cfg.train_mlp))
    if stage("train_ppo", ppo_path(cfg.train_ppo)):
        train_ppo.run(cfg.train_ppo)
    paths["ppo"] = str(ppo_path(cfg.train_ppo))
    schedule = Path(cfg.search_static.out)
    if not has_budget(cfg.search_static) and "search_static" in cfg.stages:
        print("[main] search_static: no bit budget (env.bit_budget), so no static schedule to search; skipping")
    elif stage("search_static", schedule):
        schedule.parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg.search_static, schedule.parent / "config.yaml")  # as the other stages record theirs
        found = search_static.run(cfg.search_static)
        print(f"[main] static schedule {found['schedule']} (from fixed:{found['start']['setting']}): mean Δ gold "
              f"log-lik {found['start']['objective']:+.3f} -> {found['objective']:+.3f} nats on "
              f"{len(found['rows'])} pool items, max avg bits {found['max_avg_bits']:.3f}")
    paths["schedule"] = str(schedule)

    summary = evaluate.summary_file(cfg.evaluate)
    if "evaluate" in cfg.stages:  # always called: it resumes by itself and skips finished episodes
        print(f"[main] evaluate ({time.perf_counter() - started:.0f} s into the job)")
        evaluate.run(cfg.evaluate)
    paths["summary"] = str(summary)

    if "report" in cfg.stages and summary.exists():
        report.main([str(summary), "--out", str(out)])
        paths["report"] = str(out / "report.md")
    print(f"[main] done in {time.perf_counter() - started:.0f} s; outputs in {out}")
    return paths


def parse(argv: Sequence[str] | None = None) -> MainConfig:
    """``--config``/``--set`` -> the resolved MainConfig; derived keys set by hand are errors (see module doc)."""
    overlay = _StageOverlay()
    cfg, args = parse_config(MainConfig, argv, description=__doc__.split("\n\n")[0], prepare=overlay)
    resolved = resolve(cfg)
    try:
        overlay.check(cfg, resolved)
    except ConfigError as exc:
        raise SystemExit(f"experiments.main: error: {exc}") from None
    return resolved


def main(argv: Sequence[str] | None = None) -> int:
    run(parse(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
