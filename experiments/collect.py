"""Roll out a policy or a planning teacher on the env's train split and log one CSV row per decision.

    python -m experiments.collect --config experiments/configs/collect.yaml --set episodes=50

Writes ``<out_dir>/controller_training.csv`` (columns: ``item, block, <observation names>,
latency_ms_per_token, bits``), the training data of the MLP controller. A row holds
the observation the policy acted on, the setting it committed (the label) and the measured wall time per
token of the env step that followed (commit + next block, or the ending scoring on the last step).

Calibration (``calibrate_target_bits``): the rule's thresholds are re-fitted so that it spends the target
average bits. Block features depend on the policy (later blocks run against a cache quantized by earlier
choices, and ``avg_bits``/``kv_ratio``/``last_bits`` describe it), so relabelling rows collected under
another rule would pair labels with features and latencies that rule never produced. Instead: a first
pass of ``calibration_episodes`` with the configured rule writes ``calibration.csv``; thresholds are fitted
on its ``entropy_mean`` (agents.rule.calibrate_thresholds) and saved to ``rule_thresholds.yaml``; the main
pass then rolls out the *calibrated* rule, so every row's label is what was actually committed.

Planning teachers (``policy: evidence``, ``oracle``: ``agents.oracle.PlanningPolicy``) decide a whole
episode per item: episode ``i`` takes the pool row ``teacher_rows(env, seed)[i % n]`` (a permutation of the
train split's rows, or of the env's episode set's, by ``numpy.random.default_rng(seed)``: distinct items
until the pool is used up, then the same order again), calls ``plan(env, row)`` and replays the plan with
``agents.rollout.Schedule`` through ``agents.rollout.rollout``; its rows are like every policy's (the
observation at each block, the committed setting as the label). That is how the MLP controller imitates a
privileged teacher from observable features ("learning by cheating"); the teacher never sees held-out
items here, since collect refuses the eval split.

Episode ``i`` of a plain policy is ``reset(seed=seed + i)`` (the calibration pass uses ``seed + 1_000_000 + i``),
so a run is reproducible item for item and resumable: with ``resume=true`` complete episodes already in the CSV are
kept and collection continues with the next one. The CSV is rewritten atomically every ``flush_every``
episodes and on Ctrl-C / an exception, always holding complete episodes only.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from agents.oracle import PlanningPolicy
from agents.registry import make_policy
from agents.rollout import Schedule, rollout
from agents.rule import EntropyRulePolicy, calibrate_thresholds
from envs import ENV_ID
from envs.io import atomic_write
from envs.kv_precision import EnvConfig
from envs.settings import mean_bits, parse_setting
from experiments import tracking
from experiments.config import config_to_dict, parse_config, save_config

CSV_NAME = "controller_training.csv"
CALIBRATION_CSV_NAME = "calibration.csv"
THRESHOLDS_NAME = "rule_thresholds.yaml"
CONFIG_NAME = "config.yaml"
CALIBRATION_SEED_OFFSET = 1_000_000
#: Config keys that define the data; resuming under different values would mix two datasets.
_DATA_KEYS = ("env", "policy", "seed", "calibrate_target_bits", "calibration_episodes")


@dataclass
class CollectConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # split must stay "train"
    # "rule", "rule:<thresholds.yaml>" or "rule:t1,t2,t3" (any spec when not calibrating, e.g. "static:<json>",
    # or a planning teacher: "evidence", "evidence:<setting>", "oracle", "oracle:<setting>")
    policy: str = "rule"
    episodes: int = 200  # episodes of the main pass (one CSV row per env step)
    calibrate_target_bits: float | None = None  # re-fit the rule's thresholds to this average first
    calibration_episodes: int = 20  # episodes of the calibration pass (its own CSV)
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None = torch's default; 1 is fastest on a busy machine)
    resume: bool = False  # keep complete episodes already in the CSVs and continue
    flush_every: int = 10  # rewrite the CSV (atomically) every N episodes
    out_dir: str = "runs/collect"
    wandb_project: str = "kvgym"
    wandb_group: str | None = None
    progress: bool = True


def csv_columns(observation_names: Sequence[str]) -> list[str]:
    return ["item", "block", *observation_names, "latency_ms_per_token", "bits"]


def _fmt(value: Any) -> str:
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)


def teacher_rows(env: gym.Env, seed: int) -> list[int]:
    """The rows a planning teacher's episodes take, in order: the env's episode set's rows if it has one,
    else its split's (collect: the train split), permuted by ``default_rng(seed)``."""
    base = env.unwrapped
    rows = list(base.episodes.rows) if base.episodes is not None else [item.row for item in base.items]
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


def run_episode(env: gym.Env, policy, seed: int, row: int | None = None) -> tuple[list[list[str]], dict[str, Any]]:
    """One episode of ``policy``: its CSV rows (as strings) and a summary for logging. A planning policy
    plans row ``row`` and its plan is replayed (``row`` is required then, and only then)."""
    if isinstance(policy, PlanningPolicy):
        if row is None:
            raise ValueError(f"{policy.name!r} plans per item: run_episode needs the row to plan")
        episode = rollout(env, Schedule(policy.plan(env, row)), options={"row": row}, seed=seed)
    elif row is not None:
        raise ValueError(f"row is only for planning policies; {policy.name!r} acts on observations")
    else:
        episode = rollout(env, policy, seed=seed)
    item = episode.reset_info["row"]
    rows = []
    for block, (obs, info, timings) in enumerate(zip(episode.observations, episode.infos, episode.timings[1:], strict=True)):
        latency = timings["step_ms"] / max(int(timings["tokens"]), 1)
        rows.append([str(item), str(block), *map(_fmt, obs), _fmt(latency), info["setting"]])
    final = episode.final_info
    summary = {
        "return": episode.total_reward,
        "blocks": len(episode),
        "avg_bits": float(final.get("avg_bits", float("nan"))),
        "correct_norm": float(final.get("correct_norm", float("nan"))),
    }
    return rows, summary


def _read_rows(path: Path, columns: list[str]) -> list[list[str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != columns:
            raise ValueError(
                f"{path} has columns {header}, expected {columns}: it was collected with another env config; "
                "use --set resume=false to overwrite it or choose another out_dir"
            )
        return [row for row in reader if row]


def _write_rows(path: Path, columns: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    text = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def collect_rows(
    env: gym.Env,
    policy,
    path: Path,
    *,
    episodes: int,
    first_seed: int,
    resume: bool,
    flush_every: int = 10,
    progress: bool = True,
    desc: str = "collect",
    log_fn=None,
) -> list[list[str]]:
    """Roll out ``episodes`` episodes into ``path`` (resuming from its complete episodes if asked)."""
    columns = csv_columns(env.unwrapped.observation_names)
    rows = _read_rows(path, columns) if resume and path.is_file() else []
    done = sum(1 for r in rows if r[1] == "0")  # every episode starts with block 0; only whole ones are written
    if done > episodes:
        raise ValueError(f"{path} already holds {done} episodes, more than episodes={episodes}")
    if done:
        print(f"resuming {path}: {done}/{episodes} episodes already collected")
    written = done if rows else -1  # -1: the file on disk (if any) is not this run's yet
    bar = tqdm(total=episodes, initial=done, desc=desc, unit="ep", disable=not progress)
    planned = teacher_rows(env, first_seed) if isinstance(policy, PlanningPolicy) else None
    try:
        for i in range(done, episodes):
            where = {} if planned is None else {"row": planned[i % len(planned)]}
            ep_rows, summary = run_episode(env, policy, first_seed + i, **where)
            rows += ep_rows
            bar.update(1)
            bar.set_postfix(avg_bits=f"{summary['avg_bits']:.2f}", rows=len(rows))
            if log_fn is not None:
                log_fn({f"{desc}/{k}": v for k, v in summary.items()} | {f"{desc}/episode": i})
            if (i + 1 - done) % flush_every == 0:
                _write_rows(path, columns, rows)
                written = i + 1
    finally:  # Ctrl-C or a crash keeps the complete episodes collected so far
        bar.close()
        n_eps = sum(1 for r in rows if r[1] == "0")
        if n_eps != written or not path.is_file():
            _write_rows(path, columns, rows)
    return rows


def latency_by_bits(rows: list[list[str]], columns: list[str]) -> dict[str, float]:
    """Mean measured ms/token of the steps that committed each setting (keyed by its name)."""
    lat, bits = columns.index("latency_ms_per_token"), columns.index("bits")
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r[bits], []).append(float(r[lat]))
    return {b: float(np.mean(v)) for b, v in sorted(out.items(), key=lambda kv: mean_bits(parse_setting(kv[0])))}


def _check_resumable(cfg: CollectConfig, out_dir: Path) -> None:
    saved_path = out_dir / CONFIG_NAME
    if not cfg.resume or not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = config_to_dict(cfg)
    changed = [k for k in _DATA_KEYS if saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(
            f"cannot resume in {out_dir}: {changed} differ from the earlier run's {saved_path}; "
            "use --set resume=false to start over or choose another out_dir"
        )


def run(cfg: CollectConfig) -> dict[str, Path]:
    """Collect (optionally calibrating the rule first); returns the paths written."""
    if cfg.env.layer_groups != 1:
        raise ValueError(f"collect writes one label per block, so it needs env.layer_groups=1 (got {cfg.env.layer_groups}): "
                         "the MLP controller it trains has one output class per menu entry and refuses layer groups")
    if cfg.env.split != "train":
        raise ValueError(
            f"collect rolls out on the train split only (got env.split={cfg.env.split!r}); the held-out "
            "eval items must not leak into training data: set env.split=train"
        )
    if cfg.episodes < 1 or cfg.flush_every < 1:
        raise ValueError(f"episodes and flush_every must be >= 1, got {cfg.episodes} and {cfg.flush_every}")
    out_dir = Path(cfg.out_dir)
    _check_resumable(cfg, out_dir)
    paths = {"config": save_config(cfg, out_dir / CONFIG_NAME)}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    env = gym.make(ENV_ID, config=cfg.env)
    policy = make_policy(cfg.policy, env=env)
    wb = tracking.init_run(project=cfg.wandb_project, group=cfg.wandb_group, name="collect", config=cfg,
                           job_type="collect", dir=out_dir)
    try:
        if cfg.calibrate_target_bits is not None:
            if not isinstance(policy, EntropyRulePolicy):
                raise ValueError(f"calibrate_target_bits needs a rule policy, got {cfg.policy!r}")
            if cfg.calibration_episodes < 1:
                raise ValueError(f"calibration_episodes must be >= 1, got {cfg.calibration_episodes}")
            cal_path = out_dir / CALIBRATION_CSV_NAME
            cal_rows = collect_rows(
                env, policy, cal_path, episodes=cfg.calibration_episodes,
                first_seed=cfg.seed + CALIBRATION_SEED_OFFSET, resume=cfg.resume, flush_every=cfg.flush_every,
                progress=cfg.progress, desc="calibrate", log_fn=wb.log,
            )
            col = csv_columns(policy.observation_names).index(policy.feature)
            thresholds = calibrate_thresholds(
                np.array([float(r[col]) for r in cal_rows]), policy.bits, cfg.calibrate_target_bits
            )
            policy = EntropyRulePolicy(policy.observation_names, policy.bits, thresholds, policy.feature)
            paths["calibration_csv"] = cal_path
            paths["thresholds"] = policy.save(out_dir / THRESHOLDS_NAME)
            print(f"calibrated thresholds for {cfg.calibrate_target_bits} bits: {[round(t, 4) for t in thresholds]}")
            wb.summary.update({"thresholds": list(thresholds)})

        csv_path = out_dir / CSV_NAME
        rows = collect_rows(
            env, policy, csv_path, episodes=cfg.episodes, first_seed=cfg.seed, resume=cfg.resume,
            flush_every=cfg.flush_every, progress=cfg.progress, desc="collect", log_fn=wb.log,
        )
        paths["csv"] = csv_path
        columns = csv_columns(env.unwrapped.observation_names)
        per_bits = latency_by_bits(rows, columns)
        bits_col = columns.index("bits")
        labels = [r[bits_col] for r in rows]
        widths = np.array([mean_bits(parse_setting(b)) for b in labels])
        print(f"{len(rows)} rows from {cfg.episodes} episodes -> {csv_path}")
        counts = {b: labels.count(b) for b in dict.fromkeys(labels)}
        print(f"average bits {widths.mean():.2f}; label counts {counts}")
        print("mean latency (ms/token) by bits: " + ", ".join(f"{b}: {v:.3f}" for b, v in per_bits.items()))
        wb.summary.update({"rows": len(rows), "avg_bits": float(widths.mean())})
        wb.summary.update({f"latency_ms_per_token/bits_{b}": v for b, v in per_bits.items()})
    finally:
        env.close()
        tracking.finish(wb, announce=True)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    cfg, _ = parse_config(CollectConfig, argv, description=__doc__.split("\n\n")[0])
    return run(cfg)


if __name__ == "__main__":
    main()
