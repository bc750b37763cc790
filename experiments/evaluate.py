"""Evaluate policies on the same held-out HellaSwag items with the same shots.

    python -m experiments.evaluate --set policies='[fp16, "fixed:4", rule, "mlp:runs/main/mlp.pt"]' --set items=50

Every policy runs the same episodes (``reset(options={"row": r})`` fixes item and shots), so the
differences to fp16 and to fixed 4-bit are *paired* per item, which is what makes small accuracy
differences measurable at all. Records are appended to ``records.jsonl`` as they finish, so an
interrupted run resumes where it stopped; ``summary.json`` is rewritten atomically at the end.

Policy specs: anything ``agents.registry.make_policy`` takes (``fixed:4``, ``rule``, ``rule:t.yaml``,
``mlp:mlp.pt``, ``sb3:ppo.zip``), plus ``fp16`` (every block kept at 16 bits: a real fp16 KV cache)
and ``quanto:2`` / ``quanto:4`` (the library baseline: the same episodes on an env whose cache is
transformers' ``QuantizedCache`` with the quanto backend, ``EnvConfig(cache="quanto")``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agents.registry import make_policy
from agents.rollout import rollout
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments import tracking
from experiments.config import parse_config, save_config
from experiments.io import read_jsonl, write_json
from experiments.stats import summarize_all


@dataclass
class EvaluateConfig:
    env: EnvConfig = field(default_factory=lambda: EnvConfig(split="eval"))
    policies: list[str] = field(default_factory=lambda: ["fp16", "fixed:2", "fixed:4", "fixed:8", "rule"])
    items: int = 50  # the first N items of the held-out split
    out_dir: str = "runs/evaluate"
    resume: bool = True  # skip (policy, row) pairs already in records.jsonl
    references: tuple[str, ...] = ("fp16", "fixed-4")  # paired differences against these
    wandb_project: str = "kvgym"
    wandb_group: str | None = None  # one group per comparison; default: the out_dir name
    progress: bool = True
    # Shards split the items between processes side by side (``shard=0 shards=2`` and ``shard=1
    # shards=2``, one torch thread each: ~1.3x the throughput of one process on 2 cores). They append
    # to the same records.jsonl; whichever finishes last (or any later run) writes the summary.
    shard: int = 0
    shards: int = 1
    threads: int | None = None  # torch CPU threads (None = torch's default)


Runner = Callable[[KVPrecisionEnv, int], dict]


def _policy_runner(spec: str, env: KVPrecisionEnv) -> tuple[str, Runner]:
    """Name and episode runner of one policy spec. ``quanto:N`` is the fixed policy on a sibling env whose
    cache is transformers' quanto ``QuantizedCache`` at N bits (same model, items and references)."""
    if spec.startswith("quanto:"):
        nbits = int(spec.split(":", 1)[1])
        quanto_env = env.sibling(cache="quanto", bits=(nbits,))  # fails early on bad bits/group size
        policy = make_policy(f"fixed:{nbits}", env=quanto_env)
        return f"quanto-{nbits}", lambda e, row: _run_policy(quanto_env, row, policy)
    policy = make_policy("fixed:16" if spec == "fp16" else spec, env=env)
    name = "fp16" if spec == "fp16" else policy.name
    return name, lambda e, row: _run_policy(e, row, policy)


def _run_policy(env: KVPrecisionEnv, row: int, policy) -> dict:
    episode = rollout(env, policy, options={"row": row})
    info = episode.final_info
    return {
        **{k: info[k] for k in ("pred", "pred_norm", "gold", "loglik_delta", "avg_bits", "kv_bytes", "fp16_kv_bytes")},
        "correct": int(info["correct"]),
        "correct_norm": int(info["correct_norm"]),
        "ms": episode.ms,
        "tokens": episode.reset_info["prompt_tokens"] + info["tokens"],  # the terminal step's tokens are the endings
    }


def _load_done(path: Path) -> tuple[list[dict], set[tuple[str, int]]]:
    """Finished episodes. A line cut short by a kill is skipped (its episode runs again) and closed
    with a newline, so the next record starts on a line of its own."""
    if not path.exists():
        return [], set()
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        with open(path, "a") as f:
            f.write("\n")
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"evaluate: skipping a damaged line of {path} (its episode runs again): {line[:80]!r}")
    return records, {(r["policy"], r["row"]) for r in records}


def _append(path: Path, record: dict) -> None:
    """One line per finished episode, flushed: an interruption loses at most the episode in flight."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate every policy on the same items; return the paths written."""
    if cfg.items < 1:
        raise ValueError(f"items must be >= 1, got {cfg.items}")
    if not cfg.policies:
        raise ValueError("no policies to evaluate")
    if not 0 <= cfg.shard < cfg.shards:
        raise ValueError(f"shard must be in [0, shards), got shard={cfg.shard} shards={cfg.shards}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    env_cfg = EnvConfig.from_dict({**cfg.env.__dict__, "split": "eval"})
    env = KVPrecisionEnv(env_cfg)
    try:
        rows = [item.row for item in env.items[: cfg.items]]
        if not rows:
            raise ValueError("the held-out item set is empty")
        runners = dict(_policy_runner(spec, env) for spec in cfg.policies)
        records_path = out / "records.jsonl"
        if not cfg.resume and records_path.exists():
            records_path.unlink()
        records, done = _load_done(records_path)
        mine = rows[cfg.shard :: cfg.shards]
        todo = [(name, row) for row in mine for name in runners if (name, row) not in done]
        bar = tqdm(todo, desc="evaluate", disable=not cfg.progress, unit="episode")
        for name, row in bar:
            bar.set_postfix(policy=name, row=row)
            record = {"policy": name, "row": row, **runners[name](env, row)}
            _append(records_path, record)
            records.append(record)
    finally:
        env.close()
    if cfg.shards > 1:
        records, done = _load_done(records_path)  # the other shards' episodes too
        missing = sum((name, row) not in done for row in rows for name in runners)
        if missing:
            print(f"evaluate: shard {cfg.shard}/{cfg.shards} done; {missing} episodes of other shards still to come. "
                  "The last shard to finish (or the same command without shards) writes the summary.")
            return {"records": str(records_path), "summary": None, "policies": None}
    wanted = set(rows)
    records = [r for r in records if r["row"] in wanted and r["policy"] in runners]
    policies = summarize_all(records, references=cfg.references)
    summary_path = write_json(out / "summary.json", {"config": _plain(cfg), "policies": policies})
    _log_wandb(cfg, policies, out)
    return {"records": str(records_path), "summary": str(summary_path), "policies": policies}


def _plain(cfg: EvaluateConfig) -> dict:
    from experiments.config import config_to_dict

    return config_to_dict(cfg)


def _log_wandb(cfg: EvaluateConfig, policies: dict, out: Path) -> None:
    """One wandb run per policy in a shared group, so the policies sit side by side."""
    group = cfg.wandb_group or out.name
    for name, entry in policies.items():
        run = tracking.init_run(
            project=cfg.wandb_project, group=group, name=name, config=cfg, job_type="evaluate", dir=out
        )
        tracking.log_summary_table(run, {name: entry})
        tracking.finish(run)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(EvaluateConfig, argv, description=__doc__)
    result = run(cfg)
    if result["policies"] is None:  # a shard whose siblings are still running
        return 0
    from experiments.report import print_table

    print_table(result["policies"])
    print(f"records: {result['records']}\nsummary: {result['summary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

