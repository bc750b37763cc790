"""Evaluate policies on the same held-out items of the env's task (HellaSwag by default) with the same shots.

    python -m experiments.evaluate --set policies='[fp16, "fixed:4", rule, "mlp:runs/main/mlp.pt"]' --set items=50

Every policy runs the same episodes (``reset(options={"row": r})`` fixes item and shots), so the
differences to fp16 and to fixed 4-bit are *paired* per item, which is what makes small accuracy
differences measurable at all. Records are appended to ``records.jsonl`` as they finish, so an
interrupted run resumes where it stopped; ``summary.json`` is rewritten atomically at the end.
Each record carries the fingerprint of the machine that computed it (``fingerprints.json`` says
what each id stands for): per-item quantized scores differ across machines, so a resume on another
machine is refused unless ``allow_mixed_fingerprints`` is set. ``summary.json`` lists the
``references`` compared against and the ``fingerprints`` its records hold.
``backend: ray`` runs the episodes on Ray actors, locally or on the cluster ``RAY_ADDRESS`` names
(``experiments/ray_backend.py``); the records and the resume are the same.

Policy specs: anything ``agents.registry.make_policy`` takes (``fixed:4``, ``fixed:k4v2``,
``fixed:k4v2+s4``, ``rule``, ``rule:t.yaml``, ``mlp:mlp.pt``, ``sb3:ppo.zip``), plus ``fp16`` (every
block kept at 16 bits: a real fp16 KV cache) and ``quanto:2`` / ``quanto:4`` (the library baseline:
the same episodes on an env whose cache is transformers' ``QuantizedCache`` with the quanto backend,
``EnvConfig(cache="quanto")``). A spec with env settings runs on a sibling env that has them: a fixed
setting missing from the env's menu, or sink tokens other than the env's (``fixed:k4v2+s4`` beside
``fixed:4`` on an env without sinks), so settings with and without sinks compare on the same items.
Records are keyed by the policy's canonical name (``agents.registry.canonical_name``). A planning
policy (``oracle``, ``oracle:k4v2``: evaluation only, it searches with each item's own passes) plans
each item's actions, which are then replayed like any schedule; its ``ms`` includes the planning.
``static:<schedule.json>`` is a static schedule from ``experiments.search_static``.

Several comparisons can share one ``records.jsonl`` (one per budget, or a second round on another
menu): ``name`` writes ``summary_<name>.json`` and ``config_<name>.yaml`` instead of overwriting
``summary.json``, and ``recorded`` lists policies that are only read from the records (never run, so
they need not fit this env) and are summarised and paired beside the ones that run.
``policy_env`` gives one policy env settings of its own (``{static-b3.0: {bit_budget: 3.0}}``), run on a
sibling env: policies of several budgets then share one comparison, and each item's rows are computed
together (``results/study_v2/heldout.yaml``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agents.oracle import PlanningPolicy
from agents.registry import canonical_name, env_overrides, make_policy, parse_spec
from agents.rollout import Schedule, rollout
from envs.fingerprint import fingerprint, fingerprint_id
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments import tracking
from experiments.config import parse_config, save_config
from experiments.io import write_json
from experiments.stats import fingerprint_counts, summarize_all


@dataclass
class EvaluateConfig:
    env: EnvConfig = field(default_factory=lambda: EnvConfig(split="eval"))
    policies: list[str] = field(default_factory=lambda: ["fp16", "fixed:2", "fixed:4", "fixed:8", "rule"])
    # the first N items of env.split: "eval" = the held-out items (what policies are compared on);
    # "train" = pool items, for measurements that must not touch the held-out set (experiments.frontier)
    items: int = 50
    # per policy (by its name, as records spell it): evaluate it on only the first N of those items,
    # for a costly policy (the oracle); paired differences then use the items both policies ran
    policy_items: dict[str, int] = field(default_factory=dict)
    # per policy (by its name): env settings it runs under, on a sibling env (same model, items and
    # references), e.g. ``{static-b3.0: {bit_budget: 3.0}}`` or a learned policy's budget and features,
    # so policies of several budgets share one comparison and each item's rows are computed together
    policy_env: dict[str, dict] = field(default_factory=dict)
    out_dir: str = "runs/evaluate"
    # a name for this comparison: its config and summary are written as config_<name>.yaml and
    # summary_<name>.json, so several comparisons (one per budget, say) share one records.jsonl and
    # its paired items without overwriting each other's summary; None: config.yaml and summary.json
    name: str | None = None
    resume: bool = True  # skip (policy, row) pairs already in records.jsonl
    # policies only read from records.jsonl, never run here: summarised beside the run ones and usable as
    # references (e.g. another comparison's rows on the same items, from an env with another menu); their
    # items are those of `items` (and `policy_items`) that they have records for
    recorded: list[str] = field(default_factory=list)
    # paired differences against these policies (their names, as records and the report spell them)
    references: tuple[str, ...] = ("fp16", "fixed:4")
    # Resuming on a machine whose fingerprint differs from the existing records' is refused:
    # per-item quantized scores differ across machines (envs/fingerprint.py). True mixes them anyway.
    allow_mixed_fingerprints: bool = False
    wandb_project: str = "kvgym"
    wandb_group: str | None = None  # one group per comparison; default: the out_dir name
    progress: bool = True
    # Shards split the items between processes side by side (``shard=0 shards=2`` and ``shard=1
    # shards=2``, one torch thread each: ~1.3x the throughput of one process on 2 cores). They append
    # to the same records.jsonl; whichever finishes last (or any later run) writes the summary.
    shard: int = 0
    shards: int = 1
    threads: int | None = None  # torch CPU threads (None = torch's default; 1 per Ray worker)
    # "sequential": every episode in this process; "ray": (policy, item) episodes spread over Ray actors
    # that each load the model once (experiments/ray_backend.py; a local Ray, or the cluster RAY_ADDRESS
    # names). This process keeps records.jsonl and resume either way.
    backend: str = "sequential"
    ray_workers: int | None = None  # Ray actors (None = as many as the cluster's CPUs hold at `threads` each)


Runner = Callable[[KVPrecisionEnv, int], dict]


def _policy_runner(spec: str, env: KVPrecisionEnv, settings: dict | None = None) -> Runner:
    """Episode runner of one policy spec, on a *sibling env* (same model, items and references) where
    the spec carries env settings: ``quanto:N`` is the fixed policy on an env whose cache is transformers'
    quanto ``QuantizedCache`` at N bits; ``fixed:k4v2+s4`` runs on an env with 4 fp16 sink tokens and
    K4V2 in its menu (``agents.registry.env_overrides``); ``settings`` (the config's ``policy_env`` entry
    of this policy) are applied last. Other specs run on ``env`` itself."""
    parsed = parse_spec(spec)
    if parsed.kind == "quanto":
        nbits = _quanto_bits(parsed.arg)
        overrides, spec = {"cache": "quanto", "bits": (nbits,)}, f"fixed:{nbits}"
        # the library's cache as it is: no fp16 sink tokens, and (a fixed width) no budget to enforce
        overrides |= {key: off for key, off in (("sink_tokens", 0), ("bit_budget", None))
                      if getattr(env.config, key) != off}
    else:
        overrides = env_overrides(spec, env.config)
    overrides |= settings or {}
    run_env = env.sibling(**overrides) if overrides else env  # a sibling fails early on bad settings
    policy = make_policy(spec, env=run_env)
    if isinstance(policy, PlanningPolicy):
        return lambda e, row: _run_planned(run_env, row, policy)
    return lambda e, row: _run_policy(run_env, row, policy)


def _quanto_bits(arg: str | None) -> int:
    try:
        return int(arg or "")
    except ValueError:
        raise ValueError(f"quanto needs its bits, e.g. 'quanto:4', got 'quanto:{arg}'") from None


def _run_policy(env: KVPrecisionEnv, row: int, policy) -> dict:
    episode = rollout(env, policy, options={"row": row})
    info = episode.final_info
    # tasks that define it (passkey): greedy decoding of the answer from the episode's committed cache
    exact = {"exact_match": int(env.greedy_exact_match())} if env.task.exact_match else {}
    return {
        **{k: info[k] for k in ("pred", "pred_norm", "gold", "loglik_delta", "avg_bits", "kv_bytes", "fp16_kv_bytes")},
        "correct": int(info["correct"]),
        "correct_norm": int(info["correct_norm"]),
        "ms": episode.ms,
        "tokens": episode.reset_info["prompt_tokens"] + info["tokens"],  # the terminal step's tokens are the endings
        # steps whose setting the env replaced to keep its bit budget (0 without a budget)
        "budget_enforced": sum(bool(i.get("budget_enforced", False)) for i in episode.infos),
        **exact,
        # envs with protect_bits: the prompt tokens the policy kept at protect_bits (after the budget)
        **({"protected_tokens": sum(i["protected_tokens"] for i in episode.infos)} if env.protect_bits is not None else {}),
    }


def _run_planned(env: KVPrecisionEnv, row: int, policy: PlanningPolicy) -> dict:
    """A planning policy (``oracle``): ``plan(env, row)``, then the plan replayed through ``rollout`` as
    a :class:`~agents.rollout.Schedule`, so its record is like every other policy's; ``ms`` includes the
    planning, which is the policy's cost. The record also keeps the plan (``actions``): the search cost
    most of the episode, and a stored plan can be replayed elsewhere (another machine, a perturbed run)."""
    t0 = time.perf_counter()
    actions = policy.plan(env, row)
    plan_ms = 1000 * (time.perf_counter() - t0)
    record = _run_policy(env, row, Schedule(actions))
    record["ms"] += plan_ms
    record["actions"] = actions
    return record


def _policy_name(spec: str) -> str:
    """The one name of the policy ``spec`` runs: in its records, in ``references``, the report and wandb."""
    parsed = parse_spec(spec)
    if parsed.kind == "quanto":
        return parsed.alias or f"quanto:{_quanto_bits(parsed.arg)}"
    return canonical_name(spec)


def _policy_names(cfg: EvaluateConfig) -> list[str]:
    """Names of ``cfg.policies``; a name given twice or a reference naming no policy is a config error."""
    names = [_policy_name(spec) for spec in cfg.policies]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"several policies are named {twice} (policies: {list(cfg.policies)}); "
                         "each policy's records need a name of their own")
    limited = sorted(set(cfg.policy_items) - set(names) - set(cfg.recorded))
    if limited:
        raise ValueError(f"policy_items names {limited}, which no evaluated policy is named; the policies are "
                         f"named {names}")
    bad = {name: n for name, n in cfg.policy_items.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"policy_items must map policy names to item counts >= 1, got {bad}")
    stray = sorted(set(cfg.policy_env) - set(names))
    if stray:
        raise ValueError(f"policy_env names {stray}, which no evaluated policy is named; the policies are named {names}")
    bad_env = {name: v for name, v in cfg.policy_env.items() if not isinstance(v, dict)}
    if bad_env:
        raise ValueError(f"policy_env must map policy names to env settings (a mapping), got {bad_env}")
    both = sorted(set(names) & set(cfg.recorded))
    if both:
        raise ValueError(f"{both} are both run (policies) and only read (recorded); name each in one list")
    unknown = [ref for ref in cfg.references if ref not in names and ref not in cfg.recorded]
    if unknown:
        raise ValueError(f"references {unknown} name no evaluated policy; the policies are named "
                         f"{names + list(cfg.recorded)} (set references to some of these, or add the policy)")
    return names


def _wanted_rows(cfg: EvaluateConfig, rows: list[int], names: list[str]) -> dict[str, set[int]]:
    """Each policy's items: all ``rows``, or the first ``policy_items[name]`` of them."""
    return {name: set(rows[: cfg.policy_items.get(name, len(rows))]) for name in names}


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


def _eval_env_config(cfg: EvaluateConfig) -> EnvConfig:
    """The env every backend evaluates on, checked once (the Ray actors build the same)."""
    return EnvConfig.from_dict(dict(cfg.env.__dict__))


def _runners(cfg: EvaluateConfig, names: list[str], env: KVPrecisionEnv) -> dict[str, Runner]:
    """Each policy's episode runner on ``env``, by policy name."""
    return {name: _policy_runner(spec, env, cfg.policy_env.get(name)) for name, spec in zip(names, cfg.policies, strict=True)}


def _episode_record(env: KVPrecisionEnv, runners: dict[str, Runner], name: str, row: int, fingerprint_id: str) -> dict:
    """The record of one (policy, item) episode: every backend produces its records here."""
    return {"policy": name, "row": row, **runners[name](env, row), "fingerprint": fingerprint_id}


def _episodes(cfg: EvaluateConfig, env: KVPrecisionEnv, runners: dict[str, Runner],
              todo: list[tuple[str, int]], fingerprint_id: str) -> Iterator[dict]:
    """Records of the ``todo`` episodes as they finish, from the configured backend."""
    if cfg.backend == "ray":
        from experiments.ray_backend import ray_episodes

        yield from ray_episodes(cfg, todo, fingerprint_id)
        return
    for name, row in todo:
        yield _episode_record(env, runners, name, row, fingerprint_id)


def _check_fingerprints(records: list[dict], current: str, cfg: EvaluateConfig, path: Path) -> None:
    """Refuse to add this machine's records to another machine's, unless the config allows it."""
    others = {fp: n for fp, n in fingerprint_counts(records).items() if fp != current}
    if others and not cfg.allow_mixed_fingerprints:
        raise ValueError(
            f"{path} holds records computed under fingerprint(s) {others} (id: records), and this run's "
            f"fingerprint is {current!r}; per-item quantized scores differ across machines, so the two "
            "would not compare item for item (see fingerprints.json beside it). Evaluate into a new "
            "out_dir, or set allow_mixed_fingerprints=true to continue anyway (paired differences then "
            "use only items whose records share a fingerprint).")


def _load_fingerprints(path: Path) -> dict[str, dict]:
    """``fingerprints.json``: what each fingerprint id of this out_dir's records stands for."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate every policy on the same items; return the paths written."""
    if cfg.items < 1:
        raise ValueError(f"items must be >= 1, got {cfg.items}")
    if not cfg.policies:
        raise ValueError("no policies to evaluate")
    if cfg.backend not in ("sequential", "ray"):
        raise ValueError(f"backend must be 'sequential' or 'ray', got {cfg.backend!r}")
    if not 0 <= cfg.shard < cfg.shards:
        raise ValueError(f"shard must be in [0, shards), got shard={cfg.shard} shards={cfg.shards}")
    _named("summary.json", cfg.name)  # a bad name fails before any model is loaded
    names = _policy_names(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / _named("config.yaml", cfg.name))
    env = KVPrecisionEnv(_eval_env_config(cfg))
    records_path, fingerprints_path = out / "records.jsonl", out / "fingerprints.json"
    try:
        rows = [item.row for item in env.items[: cfg.items]]
        if not rows:
            raise ValueError(f"the {cfg.env.split!r} item set is empty")
        runners = _runners(cfg, names, env)
        wanted = _wanted_rows(cfg, rows, names)
        details = fingerprint(env.model.device, env.model.dtype)
        current = fingerprint_id(details)
        if not cfg.resume and records_path.exists():
            records_path.unlink()
        records, done = _load_done(records_path)
        mine = rows[cfg.shard :: cfg.shards]
        todo = [(name, row) for row in mine for name in runners if (name, row) not in done and row in wanted[name]]
        if todo:
            _check_fingerprints(records, current, cfg, records_path)
            known = _load_fingerprints(fingerprints_path)
            if current not in known:
                write_json(fingerprints_path, {**known, current: details})
        bar = tqdm(total=len(todo), desc="evaluate", disable=not cfg.progress, unit="episode")
        for record in _episodes(cfg, env, runners, todo, current):
            _append(records_path, record)
            records.append(record)
            bar.set_postfix(policy=record["policy"], row=record["row"])
            bar.update()
        bar.close()
    finally:
        env.close()
    if cfg.shards > 1:
        records, done = _load_done(records_path)  # the other shards' episodes too
        missing = sum((name, row) not in done for name in runners for row in wanted[name])
        if missing:
            print(f"evaluate: shard {cfg.shard}/{cfg.shards} done; {missing} episodes of other shards still to come. "
                  "The last shard to finish (or the same command without shards) writes the summary.")
            return {"records": str(records_path), "summary": None, "policies": None}
    wanted |= _wanted_rows(cfg, rows, list(cfg.recorded))
    records = [r for r in records if r["policy"] in wanted and r["row"] in wanted[r["policy"]]]
    absent = sorted(set(cfg.recorded) - {r["policy"] for r in records})
    if absent:
        raise ValueError(f"recorded policies {absent} have no records among these items in {records_path}")
    policies = summarize_all(records, references=cfg.references)
    known = _load_fingerprints(fingerprints_path)
    fingerprints = {fp: {"records": n, "fingerprint": known.get(fp)} for fp, n in fingerprint_counts(records).items()}
    references = list(cfg.references)
    summary_path = write_json(summary_file(cfg), {"config": _plain(cfg), "references": references,
                                              "fingerprints": fingerprints, "policies": policies})
    _log_wandb(cfg, policies, out)
    return {"records": str(records_path), "summary": str(summary_path), "policies": policies,
            "references": references, "fingerprints": fingerprints}


def summary_file(cfg: EvaluateConfig) -> Path:
    """Where :func:`run` writes the summary: ``<out_dir>/summary.json``, or ``summary_<name>.json``."""
    return Path(cfg.out_dir) / _named("summary.json", cfg.name)


def _named(filename: str, name: str | None) -> str:
    """``summary.json`` -> ``summary_<name>.json`` (the same file without a name)."""
    if name is None:
        return filename
    if not name or "/" in name or name.strip() != name:
        raise ValueError(f"an evaluation name must be a non-empty file-name part without '/', got {name!r}")
    stem, dot, suffix = filename.rpartition(".")
    return f"{stem}_{name}{dot}{suffix}"


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
        tracking.log_summary_table(run, {name: entry}, cfg.references)
        tracking.finish(run)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(EvaluateConfig, argv, description=__doc__)
    result = run(cfg)
    if result["policies"] is None:  # a shard whose siblings are still running
        return 0
    from experiments.report import TASK_TITLES, print_table

    print_table(result["policies"], result["references"], task=TASK_TITLES.get(cfg.env.task, cfg.env.task))
    print(f"records: {result['records']}\nsummary: {result['summary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

