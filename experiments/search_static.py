"""Fit the best static schedule under a bit budget on pool items: the search baseline for learned policies.

    python -m experiments.search_static --config experiments/configs/search_static.yaml
    python -m experiments.search_static --set bit_budget=2.5 --set out=runs/search_static/b2.5.json

A static schedule (``agents.static``) plays one setting per position bin of the prompt (``bins``
equal-width bins of the ``progress`` observation) and per layer group, the same on every item. The
search, on the rows of ``episodes`` (a named episode set of the train split, e.g. ``train-0-16``) or
the explicit ``rows``, never on held-out items:

1. start: every fixed setting of the menu whose mean bits fit ``bit_budget`` is scored; the best
   whose episodes all end within the budget is the starting schedule (ties: the cheaper setting).
   With ``start: mixed`` (the default) two-level schedules that fill the budget compete too: for each
   feasible fixed setting and the next dearer one, the dearer on as many of the last (or the first)
   bins as stays feasible. Why: with fp16 sink tokens counted, the dearest setting that "fits" by its
   mean bits often does not, and a single-bin move from a cheap uniform start cannot reach "the
   dearer setting almost everywhere" (measured: the search stalled at 2-bit+sinks under 3.0 bits);
2. coordinate passes: for each bin (and layer group) in turn, every other setting is tried there with
   the rest of the schedule unchanged, and the best is kept if it improves the objective and stays
   feasible; with ``swaps`` (default on) each pass then tries paired moves -- one bin a step dearer,
   another a step cheaper (menu cost order) -- which move bits between positions at a full budget,
   where every single move is infeasible or worse; passes repeat until one changes nothing, at most
   ``max_passes``.

Objective: the mean over the rows of the terminal gold-ending log-likelihood change against full
precision (``info["loglik_delta"]``, nats; higher is better). Feasible: every episode's final
``info["avg_bits"]`` <= ``bit_budget`` (+1e-9), and no setting was replaced to keep the budget (by the
env, ``info["budget_enforced"]``, or by the policy's mask fallback before it), so the schedule plays
as written. Every episode runs through
``agents.rollout.rollout`` with the schedule's policy; results are cached per (row, actions), so a
change in a bin a short prompt never reaches costs nothing on it. Deterministic: the same config
gives the same schedule. Noise: per-item damage at low bits is chaotic across machines (the
min-max quantizer amplifies last-bit float differences), so the search averages over many items
and accepts only changes that improve that mean; more ``episodes`` make the fit steadier.

Cost: a schedule the budget cannot hold on a row (``envs.budget.plan_fits``: the env's own mask walked
over the plan) is infeasible without running that row's episode; at a tight budget most single moves
are, so the search runs a fraction of the episodes it tries.

Writes ``out`` (the schedule JSON, with the budget, the rows, the start and the whole search log) and
prints the objective before and after. Evaluate it with the policy spec ``static:<out>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.rollout import rollout
from agents.static import StaticSchedulePolicy
from envs.budget import block_bit_sum, plan_fits
from envs.episodes import episode_set
from envs.kv_precision import EnvConfig, KVPrecisionEnv, cut_blocks
from envs.settings import mean_bits, setting_name, settings_by_cost
from experiments.config import config_to_dict, parse_config

BUDGET_TOLERANCE = 1e-9


@dataclass
class SearchStaticConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # split must stay "train": never fit on held-out items
    bit_budget: float | None = None  # average bits every episode must end within (default: the env's bit_budget)
    episodes: str = "train-0-16"  # the rows the search scores on: a named episode set of the train split
    rows: list[int] | None = None  # or exactly these rows of the train split (then `episodes` is ignored)
    bins: int = 4  # position bins of the prompt (equal-width bins of `progress`)
    max_passes: int = 3  # coordinate passes over (bin, layer group); stops early when a pass changes nothing
    start: str = "mixed"  # "fixed": the best feasible fixed setting; "mixed": also two-level schedules filling the budget
    swaps: bool = True  # paired moves (one bin a step dearer, another a step cheaper) after each pass's single moves
    out: str = "runs/search_static/schedule.json"
    threads: int | None = None  # torch CPU threads (None = torch's default)
    progress: bool = True


@dataclass(frozen=True)
class Score:
    """A schedule's result on the search rows."""

    objective: float  # mean terminal loglik_delta (nats; higher is better)
    max_avg_bits: float  # the largest final avg_bits over the rows
    feasible: bool  # every episode within the budget and no setting replaced by the env

    def as_log(self) -> dict[str, Any]:
        objective = self.objective if math.isfinite(self.objective) else None  # JSON has no NaN
        return {"objective": objective, "max_avg_bits": self.max_avg_bits, "feasible": self.feasible}


class ScheduleScorer:
    """Scores schedules (``[bins, groups]`` menu indices) on the search rows, one cached episode per
    (row, actions): a schedule's actions on a row depend only on the row's block count."""

    def __init__(self, env: KVPrecisionEnv, rows: Sequence[int], budget: float, bar: tqdm | None = None):
        self.env, self.rows, self.budget, self.bar = env, list(rows), float(budget), bar
        interval = env.config.interval
        #: each row's blocks, cut as the env cuts them (the plan check reads them; the episode cache keys on the count)
        self.spans = {row: cut_blocks(len(env.episode_inputs(row)[1]), interval) for row in self.rows}
        self.blocks = {row: len(spans) for row, spans in self.spans.items()}
        self.cache: dict[tuple[int, str], tuple[float, float, bool]] = {}
        self.episodes_run = 0
        self.skipped = 0  # schedules' episodes known infeasible from the plan alone, never run

    def policy(self, table: np.ndarray) -> StaticSchedulePolicy:
        env = self.env
        policy = StaticSchedulePolicy(env.observation_names, env.bits, [[env.bits[a] for a in row] for row in table],
                                      budget=self.budget)
        if env.layer_groups != 1:
            policy.set_layer_groups(env.layer_groups)
        return policy

    def score(self, table: np.ndarray) -> Score:
        policy = self.policy(table)
        results = [self._episode(policy, row) for row in self.rows]
        deltas, avg_bits, enforced = zip(*results, strict=True)
        worst = max(avg_bits)
        feasible = worst <= self.budget + BUDGET_TOLERANCE and not any(enforced)
        return Score(float(np.mean(deltas)), float(worst), bool(feasible))

    def _episode(self, policy: StaticSchedulePolicy, row: int) -> tuple[float, float, bool]:
        actions = policy.actions_for(self.blocks[row])
        key = (row, repr(actions))
        if key not in self.cache and not self._fits(row, actions):
            # the env would push a setting back: infeasible without running the model (the objective is
            # never read for an infeasible schedule); the bits are the plan's nominal average
            self.cache[key] = (float("nan"), self._nominal_bits(row, actions), True)
            self.skipped += 1
        if key not in self.cache:
            episode = rollout(self.env, policy, options={"row": row})
            if len(episode.actions) != len(actions):
                raise RuntimeError(f"row {row}: the static policy played {len(episode.actions)} blocks, the search "
                                   f"expected {len(actions)}; the episode cache would be wrong")
            info = episode.final_info
            # a setting replaced to keep the budget, by the env or by the policy's own mask fallback
            # (rollout passes env.action_masks() to predict): the schedule did not play as written
            enforced = episode.actions != actions or any(bool(i.get("budget_enforced", False)) for i in episode.infos)
            self.cache[key] = (float(info["loglik_delta"]), float(info["avg_bits"]), enforced)
            self.episodes_run += 1
            if self.bar is not None:
                self.bar.update()
        return self.cache[key]

    def _fits(self, row: int, actions: list) -> bool:
        """Whether the env plays ``actions`` as written within the budget (``envs.budget.plan_fits``, the
        env's own mask walked block by block). Per-group actions are not predicted (True: run them)."""
        if self.env.layer_groups != 1:
            return True
        return plan_fits(self.env.bits, self.budget, self.spans[row], actions, self.env.config.sink_tokens)

    def _nominal_bits(self, row: int, actions: list) -> float:
        spans = self.spans[row]
        sinks = self.env.config.sink_tokens
        return sum(block_bit_sum(self.env.bits[a], s, e, sinks) for (s, e), a in zip(spans, actions, strict=True)) / spans[-1][1]


def search_rows(cfg: SearchStaticConfig, env: KVPrecisionEnv) -> list[int]:
    """The rows the search scores on: ``cfg.rows``, else the episode set ``cfg.episodes`` (train split)."""
    if cfg.rows is not None:
        pool = {item.row for item in env.items}
        outside = [r for r in cfg.rows if r not in pool]
        if not cfg.rows or outside:
            raise ValueError(f"rows must be a non-empty list of train-split rows; not in it: {outside}")
        return list(cfg.rows)
    return list(episode_set(cfg.episodes, env.items).rows)


def _uniform(index: int, shape: tuple[int, int]) -> np.ndarray:
    return np.full(shape, index, dtype=np.int64)


def fixed_starts(scorer: ScheduleScorer, shape: tuple[int, int], log: list[dict]) -> list[tuple[str, np.ndarray, Score]]:
    """Every uniform schedule of a setting whose mean bits fit the budget, cheapest first, scored."""
    menu = scorer.env.bits
    starts = []
    for index in settings_by_cost(menu):
        if mean_bits(menu[index]) > scorer.budget + BUDGET_TOLERANCE:
            continue
        table = _uniform(index, shape)
        score = scorer.score(table)
        log.append({"stage": "start", "setting": setting_name(menu[index]), **score.as_log()})
        starts.append((setting_name(menu[index]), table, score))
    return starts


def mixed_starts(scorer: ScheduleScorer, shape: tuple[int, int], fixed: list[tuple[str, np.ndarray, Score]],
                 log: list[dict]) -> list[tuple[str, np.ndarray, Score]]:
    """Two-level schedules that fill the budget: for each feasible uniform setting ``lo`` and the next
    dearer menu setting ``hi``, ``hi`` on the most bins (counted from the end, or from the start) that
    stays feasible and ``lo`` elsewhere (all layer groups alike)."""
    menu = scorer.env.bits
    order = settings_by_cost(menu)
    bins = shape[0]
    starts = []
    for _, table, score in fixed:
        lo = int(table[0, 0])
        if not score.feasible or order.index(lo) + 1 >= len(order) or bins < 2:
            continue
        hi = order[order.index(lo) + 1]
        for placement in ("last", "first"):
            for k in range(bins - 1, 0, -1):
                trial = table.copy()
                chosen = range(bins - k, bins) if placement == "last" else range(k)
                trial[list(chosen), :] = hi
                trial_score = scorer.score(trial)
                name = f"{setting_name(menu[hi])} on the {placement} {k} of {bins} bins, {setting_name(menu[lo])} elsewhere"
                log.append({"stage": "start", "setting": name, **trial_score.as_log()})
                if trial_score.feasible:
                    starts.append((name, trial, trial_score))
                    break
    return starts


def best_start(scorer: ScheduleScorer, shape: tuple[int, int], kind: str,
               log: list[dict]) -> tuple[str, np.ndarray, Score]:
    """The best feasible starting schedule (ties: the first found, i.e. the cheaper fixed setting)."""
    if kind not in ("fixed", "mixed"):
        raise ValueError(f"start must be 'fixed' or 'mixed', got {kind!r}")
    candidates = fixed_starts(scorer, shape, log)
    feasible_fixed = [c for c in candidates if c[2].feasible]
    if not feasible_fixed:
        menu = scorer.env.bits
        raise ValueError(f"no fixed setting of the menu {[setting_name(b) for b in menu]} ends every search episode "
                         f"within the budget of {scorer.budget} average bits (fp16 sink tokens count 16); raise the "
                         "budget or add a cheaper setting")
    if kind == "mixed":
        candidates += mixed_starts(scorer, shape, feasible_fixed, log)
    best = None
    for name, table, score in candidates:
        if score.feasible and (best is None or score.objective > best[2].objective):
            best = (name, table, score)
    assert best is not None
    return best


def coordinate_search(scorer: ScheduleScorer, table: np.ndarray, score: Score, max_passes: int,
                      log: list[dict], swaps: bool = True) -> tuple[np.ndarray, Score, int]:
    """Passes over (bin, group): at each, the best feasible setting if it improves the objective; then,
    with ``swaps``, the best improving paired move (one cell a step dearer, another a step cheaper)."""
    menu = scorer.env.bits
    bins, groups = table.shape
    passes = 0
    for passes in range(1, max_passes + 1):
        changed = False
        for b in range(bins):
            for g in range(groups):
                best_index, best_score = int(table[b, g]), score
                for index in settings_by_cost(menu):  # cheapest first: an equal objective keeps the cheaper
                    if index == table[b, g]:
                        continue
                    trial = table.copy()
                    trial[b, g] = index
                    trial_score = scorer.score(trial)
                    better = trial_score.feasible and trial_score.objective > best_score.objective
                    log.append({"stage": f"pass {passes}", "bin": b, "group": g, "setting": setting_name(menu[index]),
                                **trial_score.as_log(), "better": better})
                    if better:
                        best_index, best_score = index, trial_score
                if best_index != table[b, g]:
                    table = table.copy()
                    table[b, g] = best_index
                    score, changed = best_score, True
                    log.append({"stage": f"pass {passes}", "bin": b, "group": g,
                                "accepted": setting_name(menu[best_index]), **score.as_log()})
                if scorer.bar is not None:
                    scorer.bar.set_postfix(objective=f"{score.objective:.4f}", passes=passes)
        if swaps:
            moved = best_swap(scorer, table, score, log, f"pass {passes} swaps")
            if moved is not None:
                table, score, changed = moved[0], moved[1], True
        if not changed:
            break
    return table, score, passes


def best_swap(scorer: ScheduleScorer, table: np.ndarray, score: Score, log: list[dict],
              stage: str) -> tuple[np.ndarray, Score] | None:
    """The best feasible improving paired move: cell ``up`` one step dearer and cell ``down`` one step
    cheaper in the menu's cost order; None when none improves."""
    order = settings_by_cost(scorer.env.bits)
    menu = scorer.env.bits
    cells = [(b, g) for b in range(table.shape[0]) for g in range(table.shape[1])]
    best: tuple[np.ndarray, Score] | None = None
    for up in cells:
        rank_up = order.index(int(table[up]))
        if rank_up + 1 >= len(order):
            continue
        for down in cells:
            rank_down = order.index(int(table[down]))
            if down == up or rank_down == 0:
                continue
            trial = table.copy()
            trial[up], trial[down] = order[rank_up + 1], order[rank_down - 1]
            trial_score = scorer.score(trial)
            better = trial_score.feasible and trial_score.objective > (best[1] if best else score).objective
            log.append({"stage": stage, "up": list(up), "down": list(down), **trial_score.as_log(), "better": better})
            if better:
                best = (trial, trial_score)
    if best is not None:
        log.append({"stage": stage, "accepted": [[setting_name(menu[i]) for i in row] for row in best[0]],
                    **best[1].as_log()})
    return best


def run(cfg: SearchStaticConfig) -> dict[str, Any]:
    """Search, write the schedule JSON; return its path, the schedule and the objective before/after."""
    if cfg.env.split != "train":
        raise ValueError(f"the static schedule is fitted on pool items: env.split must be 'train', got {cfg.env.split!r}")
    if cfg.bins < 1 or cfg.max_passes < 0:
        raise ValueError(f"bins must be >= 1 and max_passes >= 0, got bins={cfg.bins} max_passes={cfg.max_passes}")
    env_budget = getattr(cfg.env, "bit_budget", None)
    budget = cfg.bit_budget if cfg.bit_budget is not None else env_budget
    if budget is None:
        raise ValueError("the search needs a budget: set bit_budget (average bits, e.g. 3.0)")
    if env_budget is not None and abs(env_budget - budget) > BUDGET_TOLERANCE:
        raise ValueError(f"bit_budget={budget} but env.bit_budget={env_budget}; set one, or both the same")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    env = KVPrecisionEnv(cfg.env)
    try:
        rows = search_rows(cfg, env)
        bar = tqdm(desc="search_static", unit="episode", disable=not cfg.progress)
        scorer = ScheduleScorer(env, rows, budget, bar)
        shape = (cfg.bins, env.layer_groups)
        log: list[dict[str, Any]] = []
        start_name, start, start_score = best_start(scorer, shape, cfg.start, log)
        table, score, passes = coordinate_search(scorer, start, start_score, cfg.max_passes, log, cfg.swaps)
        bar.close()
        policy = scorer.policy(table)
        policy.meta = {
            "objective": score.objective,
            "max_avg_bits": score.max_avg_bits,
            "start": {"setting": start_name, "objective": start_score.objective,
                      "max_avg_bits": start_score.max_avg_bits},
            "passes": passes,
            "episodes_run": scorer.episodes_run,
            "episodes_skipped": scorer.skipped,  # known over budget from the plan, never run
            "rows": rows,
            "episodes": None if cfg.rows is not None else cfg.episodes,
            "config": config_to_dict(cfg),
        }
        policy.log = log
        path = policy.save(cfg.out)
    finally:
        env.close()
    return {"out": str(path), "schedule": policy.schedule_names(), "start": policy.meta["start"],
            "objective": score.objective, "max_avg_bits": score.max_avg_bits, "rows": rows,
            "episodes_run": scorer.episodes_run, "episodes_skipped": scorer.skipped}


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_config(SearchStaticConfig, argv, description=__doc__)
    result = run(cfg)
    start = result["start"]
    budget = cfg.bit_budget if cfg.bit_budget is not None else getattr(cfg.env, "bit_budget", None)
    print(f"rows: {len(result['rows'])}  budget: {budget} average bits")
    print(f"before ({start['setting']}): objective {start['objective']:+.4f} nats, "
          f"max avg bits {start['max_avg_bits']:.3f}")
    print(f"after  (static schedule):     objective {result['objective']:+.4f} nats, "
          f"max avg bits {result['max_avg_bits']:.3f}")
    print("schedule (bin: settings per layer group): "
          + ", ".join(f"{b}: {'/'.join(s)}" for b, s in enumerate(result["schedule"])))
    print(f"schedule: {result['out']}  (evaluate with the policy spec 'static:{result['out']}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
