"""Where every fixed KV setting lands: damage, accuracy, memory and decode cost, before any policy.

    python -m experiments.frontier --config experiments/configs/frontier.yaml
    python -m experiments.frontier --set stages='[8, 24]' --set out_dir=runs/frontier_small

The grid: every (key bits, value bits) pair with key bits >= value bits from ``widths`` (keys are
the sensitive half, so K2V4-like pairs are left out), plus 16 (fp16), each also with
``sink_tokens`` fp16 sink tokens. Every setting is the fixed policy ``fixed:<setting>`` run on
*pool* items (``env.split: train``; never the held-out ones) with each item's fixed shots, through
:func:`experiments.evaluate.run`: the same episodes, the same per-item records and resume, paired
against fp16 (``fp16`` runs in every round).

Successive halving, one evaluate stage per round: round ``r`` runs the surviving settings on the
first ``stages[r]`` pool items (the items of earlier rounds are reused from the records, so a
round only adds items). After every round but the last, the survivors are (:func:`survivors`):

* every setting on the Pareto front of (KV bytes / fp16 KV bytes, mean Δ gold log-lik): nothing
  else saves as many bytes with as little damage, so none of them is ever dropped; and
* the best ``ceil(keep * settings)`` by damage per byte saved, ``Δ gold log-lik / (1 - KV ratio)``
  (nats lost per unit of the fp16 cache saved; closer to 0 is better); and fp16, the reference.

Outputs in ``out_dir``: a terminal table, ``frontier.json`` (every round's settings and summaries,
the last summary of each setting with the round it reached, the Pareto front, and each setting's
relative decode cost from ``latency_table`` when given), ``frontier.png`` (Δ gold log-lik and
acc_norm against average bits and KV bytes for the settings of the last round, the front drawn),
``frontier_round1.png`` (every setting on the first round's items), and the evaluate records under
``evaluate/``. Interrupted runs resume item by item: run the same command again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agents.registry import canonical_name
from envs.kv_precision import EnvConfig
from envs.latency import load_latency_table, setting_key
from experiments import evaluate
from experiments.config import config_to_dict, parse_config, save_config
from experiments.io import write_json
from experiments.report import Column, pareto_front, plot_pareto, print_table

REFERENCE = "fp16"
FULL = 16


def setting_grid(widths: Sequence[int] = (2, 3, 4, 8)) -> list[int | tuple[int, int]]:
    """Every setting with key bits >= value bits from ``widths``, plus 16: ints where both halves
    are equal, ``(key_bits, value_bits)`` pairs otherwise, from the cheapest keys up."""
    ws = sorted(set(widths) - {FULL})
    grid: list[int | tuple[int, int]] = []
    for k in ws:
        grid += [(k, v) if v != k else k for v in ws if v <= k]
    return [*grid, FULL]


@dataclass(frozen=True)
class Setting:
    """One grid point: its bits, its fp16 sink tokens, and the fixed-policy spec that runs it."""

    bits: int | tuple[int, int]
    sink_tokens: int = 0

    @property
    def key(self) -> str:
        """Its latency-table key (``envs.latency.setting_key``): ``4``, ``k4v2+s4``, ``16``."""
        return setting_key(self.bits, self.sink_tokens)

    @property
    def spec(self) -> str:
        """The policy spec (and record name) evaluate runs it under: ``fp16``, ``fixed:k4v2+s4``."""
        return REFERENCE if self.key == str(FULL) else f"fixed:{self.key}"


def grid_settings(widths: Sequence[int], sink_tokens: Sequence[int]) -> list[Setting]:
    """The grid's settings with each sink count; 16 bits once (sinks change nothing there)."""
    out: dict[str, Setting] = {}
    for sinks in sink_tokens:
        for bits in setting_grid(widths):
            s = Setting(bits, sinks)
            out.setdefault(s.spec, Setting(bits, 0) if s.key == str(FULL) else s)
    return list(out.values())


def damage_per_byte(summary: dict) -> float:
    """Mean Δ gold log-lik per unit of fp16 cache saved (closer to 0 is better); -inf saves nothing."""
    saved = 1.0 - summary["kv_ratio"]["mean"]
    return summary["loglik_delta"]["mean"] / saved if saved > 0 else -math.inf


def survivors(policies: dict[str, dict], keep: float) -> list[str]:
    """The settings that go on to the next round (module doc): the (KV ratio, Δ gold log-lik) Pareto
    front, the best ``ceil(keep * n)`` by :func:`damage_per_byte`, and the fp16 reference; in the
    order of ``policies``."""
    names = list(policies)
    points = [(policies[n]["summary"]["kv_ratio"]["mean"], policies[n]["summary"]["loglik_delta"]["mean"])
              for n in names]
    front = {names[i] for i in pareto_front(points)}
    ranked = sorted((n for n in names if n != REFERENCE), key=lambda n: -damage_per_byte(policies[n]["summary"]))
    best = set(ranked[: math.ceil(keep * len(names))])
    return [n for n in names if n in front or n in best or n == REFERENCE]


@dataclass
class FrontierConfig:
    env: EnvConfig = field(default_factory=lambda: EnvConfig(split="train"))  # pool items only
    widths: list[int] = field(default_factory=lambda: [2, 3, 4, 8])  # key bits >= value bits from these, + 16
    sink_tokens: list[int] = field(default_factory=lambda: [0, 4])  # each setting with these fp16 sink tokens
    # items per halving round: every setting on the first stages[0] pool items, the survivors of each
    # round on the next count (the items are nested: a round adds items, it never redoes one)
    stages: list[int] = field(default_factory=lambda: [32, 200])
    keep: float = 0.5  # share of the settings kept by damage per byte (the Pareto front is always kept)
    latency_table: str | None = None  # a table from experiments.bench_latency: adds each setting's decode cost
    out_dir: str = "runs/frontier"
    resume: bool = True
    allow_mixed_fingerprints: bool = False
    wandb_project: str = "kvgym"
    progress: bool = True
    # as in experiments.evaluate: shards split each round's items between processes side by side;
    # a shard that finishes a round first waits for the others (it polls the records) before choosing
    shard: int = 0
    shards: int = 1
    threads: int | None = None
    poll_seconds: float = 30.0  # how often a waiting shard looks at the records again

    def validate(self) -> None:
        if not self.stages or any(n < 1 for n in self.stages) or list(self.stages) != sorted(self.stages):
            raise ValueError(f"stages must be non-decreasing positive item counts, got {self.stages}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.env.split != "train":
            raise ValueError("the frontier is measured on pool items (env.split=train), never on held-out ones")
        if any(s < 0 for s in self.sink_tokens) or not self.sink_tokens:
            raise ValueError(f"sink_tokens must be a non-empty list of counts >= 0, got {self.sink_tokens}")


def _evaluate_stage(cfg: FrontierConfig, round_: int, specs: list[str]) -> dict:
    """One halving round through experiments.evaluate (shared records: earlier items are reused)."""
    out = Path(cfg.out_dir)
    ecfg = evaluate.EvaluateConfig(
        env=cfg.env, policies=specs, items=cfg.stages[round_], out_dir=str(out / "evaluate"),
        resume=cfg.resume or round_ > 0, references=(REFERENCE,), allow_mixed_fingerprints=cfg.allow_mixed_fingerprints,
        wandb_project=cfg.wandb_project, wandb_group=f"{out.name}-round{round_ + 1}", progress=cfg.progress,
        shard=cfg.shard, shards=cfg.shards, threads=cfg.threads,
    )
    result = evaluate.run(ecfg)
    while result["policies"] is None:  # other shards still run this round: their records decide it too
        time.sleep(cfg.poll_seconds)
        result = evaluate.run(ecfg)
    return result


def run(cfg: FrontierConfig) -> dict:
    """All rounds; returns what ``frontier.json`` holds."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "frontier.config.yaml")
    table = load_latency_table(cfg.latency_table) if cfg.latency_table else None
    settings = {canonical_name(s.spec): s for s in grid_settings(cfg.widths, cfg.sink_tokens)}
    if table is not None:  # fail before hours of episodes, not after
        for s in settings.values():
            table.cost(s.key)
    alive = list(settings)
    rounds, last_entry = [], {}
    for r in range(len(cfg.stages)):
        result = _evaluate_stage(cfg, r, alive)
        policies = result["policies"]
        for name, entry in policies.items():
            last_entry[name] = {**entry, "round": r + 1}
        kept = survivors(policies, cfg.keep) if r + 1 < len(cfg.stages) else list(policies)
        rounds.append({"round": r + 1, "items": cfg.stages[r], "settings": alive, "kept": kept,
                       "policies": policies})
        alive = kept
    for name, entry in last_entry.items():
        s = settings[name]
        entry["setting"] = {"bits": s.bits, "sink_tokens": s.sink_tokens, "key": s.key}
        if table is not None:
            entry["relative_decode_cost"] = table.cost(s.key)
    final = rounds[-1]["policies"]
    front = _fronts(final)
    result = {"config": config_to_dict(cfg), "latency_table": None if table is None else
              {"path": str(table.path), "label": table.label, "context": table.meta.get("context"),
               "threads": table.meta.get("threads")},
              "rounds": rounds, "settings": last_entry, "pareto_front": front,
              "fingerprints": evaluate_fingerprints(out)}
    write_json(out / "frontier.json", result)
    plot_pareto(final, out / "frontier.png", label=_short, log_x=True,
                title=f"Fixed KV settings on {cfg.stages[-1]} pool items (round {len(cfg.stages)})")
    if len(cfg.stages) > 1:
        plot_pareto(rounds[0]["policies"], out / "frontier_round1.png", label=_short, log_x=True,
                    title=f"Every fixed KV setting on {cfg.stages[0]} pool items (round 1)")
    return result


def _short(name: str) -> str:
    """A setting's plot label: its spec without ``fixed:`` (``k4v2+s4``), so 21 labels fit."""
    return name.removeprefix("fixed:")


def evaluate_fingerprints(out: Path) -> dict:
    """What computed the records (evaluate's fingerprints.json beside them)."""
    import json

    path = out / "evaluate" / "fingerprints.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _fronts(policies: dict[str, dict]) -> dict[str, list[str]]:
    """The Pareto front of each (memory axis, quality axis) pair the plot shows."""
    fronts = {}
    for x in ("avg_bits", "kv_ratio"):
        for y in ("loglik_delta", "acc_norm"):
            names = list(policies)
            pts = [(policies[n]["summary"][x]["mean"], policies[n]["summary"][y]["mean"]) for n in names]
            fronts[f"{y}_vs_{x}"] = [names[i] for i in sorted(pareto_front(pts), key=lambda i: pts[i][0])]
    return fronts


def extra_columns(has_latency: bool) -> list[Column]:
    """The frontier's columns beside the comparison's: KV size, the round reached, the decode cost."""
    cols = [Column("kv_mib", "KV MiB", lambda e: {k: v / 2**20 for k, v in e["summary"]["kv_bytes"].items()}, ".2f"),
            Column("round", "round", lambda e: e["round"], plain=True)]
    if has_latency:
        cols.append(Column("relative_decode_cost", "decode x DynamicCache",
                           lambda e: f"{e['relative_decode_cost']:.3f}", plain=True))
    return cols


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(FrontierConfig, argv, description=__doc__)
    result = run(cfg)
    ordered = dict(sorted(result["settings"].items(), key=lambda kv: kv[1]["summary"]["kv_ratio"]["mean"]))
    print_table(ordered, [REFERENCE], extra=extra_columns(cfg.latency_table is not None))
    for axes, names in result["pareto_front"].items():
        print(f"Pareto front ({axes.replace('_', ' ')}): {', '.join(names)}")
    print(f"wrote {Path(cfg.out_dir) / 'frontier.json'} and {Path(cfg.out_dir) / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
