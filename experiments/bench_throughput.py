"""Episodes per second of every way to run KVPrecision-v0, side by side in one run.

    python -m experiments.bench_throughput --model embedded --episodes 8 --num-envs 2

Rows, each at fixed bits on the held-out split: the single env (one process, torch's threads);
Gymnasium's ``SyncVectorEnv`` of N envs (``gym.make_vec(..., vectorization_mode="sync")``); the
batched vector env of N rows, one forward per step for all of them (``vectorization_mode=
"vector_entry_point"``, envs/vector.py), its endings scored row by row (``batched``) and, the rows that end
in the same step, in the block forward (``batched-scoring``: the env's ``batch_scoring``, its default on
every device); the Ray backend of ``evaluate`` with N workers (``--threads`` torch threads each, default 1). Plus whole env / bare forward:
the single env's wall time over a bare SDPA forward of the same blocks
(``experiments.bench_env.bare_forward_ms``, ``model(block, cache=DynamicCache())``). Measuring them
in one run keeps the ratios meaningful on a shared, noisy machine, where absolute numbers are not; and the
single and batched runners take the rows in ``--rounds`` parts, in turn (:func:`run_rounds`), so that a slow
spell hits them alike (two runs in a row on one machine once gave 1.28x and 1.68x when each ran all its rows
at once). The table gives each round's ratio too, lowest-highest.

``--count-ops`` adds the torch operators each row-step issues (one env step, or reset, of one row), counted
in one more pass: on a GPU each operator is at least one kernel launch, so this is what bounds the
batched env there when the device itself is fast (:class:`TorchOpCounter`), measured on any machine.

The references of those rows are computed and stored first (:func:`store_references`), so every
runner reads them and none pays them for the others.

Episodes: the single env, the batched env and Ray run the first ``--episodes`` held-out rows with
their fixed shots (what ``evaluate`` runs; the batched env as reset's queue of rows, each once); the
sync vector env draws held-out items and shots at random (autoreset gives
no row), so its episodes are of the same kind, not the same ones. Ray's rate is measured once every
worker has finished an episode (model loading and Ray's start are reported apart, as startup).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from agents.fixed import FixedBitsPolicy
from agents.rollout import rollout
from envs import batched_forward
from experiments.bench_env import bare_forward_ms
from experiments.io import write_json

ROWS = ("single", "sync", "batched", "batched-scoring", "ray")


class TorchOpCounter(TorchDispatchMode):
    """Counts the torch operators dispatched while it is active (``with TorchOpCounter() as c: ...; c.ops``).

    Why: on a GPU every operator is at least one kernel launch, a few microseconds of CPU time each in eager
    PyTorch, so a step that issues many small operators per row is bound by launches however fast the device
    is (the H200 ran the batched env at 6.7 episodes/s, results/gpu_h200). The count is the same on any
    device, so the work that would bring it down can be measured on a CPU. While counting, a batched forward
    attends as on a GPU, by groups of rows (``envs.batched_forward.ATTEND_BY_ROW``; a CPU attends row by row)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self._attend_by_row = None

    def __enter__(self):
        self._attend_by_row, batched_forward.ATTEND_BY_ROW = batched_forward.ATTEND_BY_ROW, False
        return super().__enter__()

    def __exit__(self, *exc):
        batched_forward.ATTEND_BY_ROW = self._attend_by_row
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _env_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"model": args.model, "split": "eval"}
    kw.update({k: v for k, v in (("shots", args.shots), ("interval", args.interval)) if v is not None})
    return kw


def store_references(args: argparse.Namespace) -> int:
    """Compute and store the full-precision references of every row the runners measure, before any
    is timed: otherwise the first runner pays them and every later one reads them from the store,
    which flatters the later ones (the batched env looked 2x the single env on a cold store, 1.1x
    on a warm one). Returns the number of rows prepared."""
    from envs.kv_precision import KVPrecisionEnv

    env = KVPrecisionEnv(**_env_kwargs(args))
    if env.reference_store is None:
        raise ValueError("bench_throughput needs the env's reference store (reference_store: true)")
    rows = [item.row for item in env.items[: 1 + max(args.episodes, args.num_envs)]]
    for row in rows:
        env.reset(options={"row": row})  # the reset runs (or loads) the item's reference pass
    env.close()
    return len(rows)


def _round_rows(items, args: argparse.Namespace, at_least: int = 1) -> list[int]:
    """The warm-up row (the first held-out row), then the rows this round measures (``args.measured``, indices
    into ``items``; the last repeated up to ``at_least`` rows: the batched env's reset needs one per env)."""
    rows = [items[min(i, len(items) - 1)].row for i in args.measured]
    return [items[0].row] + rows + rows[-1:] * (at_least - len(rows))


def bench_single(args: argparse.Namespace) -> dict[str, Any]:
    """The single env on the first ``episodes`` held-out rows (after one warm-up), and the bare
    SDPA forward of the same blocks."""
    from transformers import DynamicCache

    from envs.kv_precision import KVPrecisionEnv
    from envs.model import load_model

    env = KVPrecisionEnv(**_env_kwargs(args))
    policy = FixedBitsPolicy(env.observation_names, env.bits, args.bits)
    rows = _round_rows(env.items, args)
    rollout(env, policy, options={"row": rows[0]})  # warm-up: first-call costs, not measured
    t0 = time.perf_counter()
    for row in rows[1:]:
        rollout(env, policy, options={"row": row})
    wall = time.perf_counter() - t0
    ops = None
    if args.count_ops and args.first_round:  # one more pass over the first measured row, counted (slow)
        with TorchOpCounter() as counter:
            episode = rollout(env, policy, options={"row": rows[1]})
        ops = counter.ops / (len(episode) + 1)  # the reset runs block 0: one row-step of its own

    sdpa, _ = load_model(args.model, dtype=env.model.dtype, device=env.model.device, attn_implementation="sdpa")
    interval, bare_ms = env.config.interval, 0.0
    for row in rows[1:]:
        prompt_ids = env.episode_inputs(row)[1]
        cache = DynamicCache(config=sdpa.config)
        for start in range(0, len(prompt_ids), interval):
            bare_ms += bare_forward_ms(sdpa, cache, prompt_ids[start : start + interval])
    env.close()
    return {"episodes": len(rows) - 1, "seconds": wall, "episodes_per_s": (len(rows) - 1) / wall,
            "bare_sdpa_seconds": bare_ms / 1000, "whole_env_over_bare_sdpa": wall / (bare_ms / 1000),
            "threads": torch.get_num_threads(), "ops_per_row_step": ops}


def bench_sync(args: argparse.Namespace) -> dict[str, Any]:
    """``SyncVectorEnv(N)`` with next-step autoreset until ``episodes`` episodes have ended."""
    import gymnasium as gym

    from envs import ENV_ID

    vec = gym.make_vec(ENV_ID, num_envs=args.num_envs, vectorization_mode="sync", **_env_kwargs(args))
    action = list(vec.envs[0].unwrapped.bits).index(args.bits)
    actions = np.full(args.num_envs, action)
    vec.reset(seed=0)
    t0, finished = time.perf_counter(), 0
    while finished < args.episodes:
        _, _, terminated, truncated, _ = vec.step(actions)
        finished += int(np.sum(terminated | truncated))
    wall = time.perf_counter() - t0
    vec.close()
    return {"episodes": finished, "seconds": wall, "episodes_per_s": finished / wall,
            "num_envs": args.num_envs, "threads": torch.get_num_threads()}


def bench_ray(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate``'s Ray backend, N workers, on the first ``episodes`` held-out rows; the rate
    counts from the moment every worker has finished its first episode."""
    from envs.fingerprint import fingerprint, fingerprint_id
    from envs.kv_precision import EnvConfig, KVPrecisionEnv
    from experiments.evaluate import EvaluateConfig
    from experiments.ray_backend import ray_episodes

    n = args.num_envs
    if args.episodes <= n:
        raise ValueError(f"--episodes must exceed --num-envs for the Ray row (its rate starts after {n} episodes)")
    env_cfg = EnvConfig.from_dict(_env_kwargs(args))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EvaluateConfig(env=env_cfg, policies=[f"fixed:{args.bits}"], references=(f"fixed:{args.bits}",),
                             items=args.episodes, out_dir=tmp, backend="ray", ray_workers=n,
                             threads=args.threads or 1)
        env = KVPrecisionEnv(env_cfg)
        todo = [(f"fixed:{args.bits}", item.row) for item in env.items[: args.episodes]]
        current = fingerprint_id(fingerprint(env.model.device, env.model.dtype))
        env.close()
        t0 = time.perf_counter()
        done_at = [time.perf_counter() - t0 for _ in ray_episodes(cfg, todo, current)]
    steady = (len(done_at) - n) / (done_at[-1] - done_at[n - 1])
    return {"episodes": len(done_at), "seconds": done_at[-1], "episodes_per_s": steady,
            "startup_seconds": done_at[n - 1], "workers": n, "threads": cfg.threads}


def bare_batching_gain(model, prompts: Sequence[Sequence[int]], interval: int) -> dict[str, float] | None:
    """What batching buys the bare model on this machine, the ceiling of the batched env's gain: the bare
    SDPA forwards of the common full blocks of ``prompts`` (one cache each, row by row) against the same
    blocks with all rows in one batch (one cache of ``len(prompts)`` rows). Block by block, the two are
    interleaved so that load from other processes hits both alike. On a few CPU cores a 64-token block
    already fills the vector units, so the gain is small; on a GPU it is large. None when the prompts
    share no full block."""
    from transformers import DynamicCache

    blocks = min(len(p) for p in prompts) // interval
    if blocks < 1:
        return None
    singles = [DynamicCache(config=model.config) for _ in prompts]
    batch = DynamicCache(config=model.config)
    single_ms = batched_ms = 0.0
    for b in range(blocks):
        part = [list(p[b * interval : (b + 1) * interval]) for p in prompts]
        single_ms += sum(bare_forward_ms(model, cache, ids) for cache, ids in zip(singles, part, strict=True))
        batched_ms += bare_forward_ms(model, batch, part)
    return {"rows": len(prompts), "blocks": blocks, "single_seconds": single_ms / 1000,
            "batched_seconds": batched_ms / 1000, "gain": single_ms / batched_ms}


def bench_batched(args: argparse.Namespace, batch_scoring: bool = False) -> dict[str, Any]:
    """The batched vector env (``vectorization_mode="vector_entry_point"``, one forward per step for all
    its rows) on the single env's ``episodes`` held-out rows, given as reset's row queue: each row runs
    once, a row that ends takes the next one, and rows left without one sit out (``idle``). One warm-up
    step first (first-call costs, not measured). ``batch_scoring``: the env's option (the rows that end in
    the same step score their endings in one forward; the ``batched-scoring`` row), else row by row; the
    bare batching gain is measured only without it (it does not depend on it)."""
    import gymnasium as gym

    from envs import ENV_ID

    n = args.num_envs
    vec = gym.make_vec(ENV_ID, num_envs=n, vectorization_mode="vector_entry_point", batch_scoring=batch_scoring,
                       **_env_kwargs(args))
    actions = np.full(n, list(vec.envs[0].bits).index(args.bits))
    rows = _round_rows(vec.envs[0].items, args, at_least=n)
    vec.reset(options={"rows": [rows[0]] * n})  # warm-up
    vec.step(actions)
    t0, finished = time.perf_counter(), 0
    vec.reset(options={"rows": rows[1:]})
    while not vec.idle.all():
        _, _, terminated, truncated, _ = vec.step(actions)
        finished += int(np.sum(terminated | truncated))
    wall = time.perf_counter() - t0
    ops = None
    if args.count_ops and args.first_round:  # one more pass over the first n measured rows, together, counted
        row_steps = n
        with TorchOpCounter() as counter:
            vec.reset(options={"rows": rows[1 : n + 1]})
            while not vec.idle.all():
                row_steps += int(np.sum(~vec.idle))
                vec.step(actions)
        ops = counter.ops / row_steps
    from envs.model import load_model

    env = vec.envs[0]
    gain = None
    prompts = [env.episode_inputs(row)[1] for row in rows[1 : n + 1]]
    if not batch_scoring and len(prompts) == n and args.first_round:
        sdpa, _ = load_model(args.model, dtype=env.model.dtype, device=env.model.device, attn_implementation="sdpa")
        gain = bare_batching_gain(sdpa, prompts, env.config.interval)
    vec.close()
    return {"episodes": finished, "seconds": wall, "episodes_per_s": finished / wall,
            "num_envs": n, "threads": torch.get_num_threads(), "bare_batching": gain, "ops_per_row_step": ops}


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "single": bench_single, "sync": bench_sync, "batched": bench_batched,
    "batched-scoring": partial(bench_batched, batch_scoring=True), "ray": bench_ray,
}


#: the runners that run the same held-out rows, so a round of each can be compared with the others' (paired)
PAIRED = ("single", "batched", "batched-scoring")


def run_rounds(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every runner in ``args.rows``. The paired ones (:data:`PAIRED`) take the measured rows in ``--rounds``
    consecutive parts, each part by every runner in turn (in reverse order every other round), so that a
    slow spell of a shared machine hits them all alike rather than whichever ran then; their totals are summed
    and each round's rate kept (``rounds``). The others run once, after them, on all the rows."""
    paired = [name for name in args.rows if name in PAIRED]
    rounds = max(1, min(args.rounds, args.episodes // args.num_envs)) if paired else 1  # >= num_envs rows each
    parts = np.array_split(np.arange(1, args.episodes + 1), rounds)
    by_round: dict[str, list[dict[str, Any]]] = {name: [] for name in paired}
    for k, part in enumerate(parts):
        round_args = argparse.Namespace(**vars(args), measured=part.tolist(), first_round=k == 0)
        for name in paired if k % 2 == 0 else paired[::-1]:
            by_round[name].append(BENCHES[name](round_args))
    results = {name: _summed(by_round[name]) for name in paired}
    everything = argparse.Namespace(**vars(args), measured=list(range(1, args.episodes + 1)), first_round=True)
    results.update({name: BENCHES[name](everything) for name in args.rows if name not in PAIRED})
    return {name: results[name] for name in args.rows}


def _summed(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One runner's rounds as one result: episodes and seconds summed, the rate and whole/bare of the sums, what
    only the first round measures (ops, the bare batching gain) from it, and each round's rate (``rounds``)."""
    out = dict(rounds[0])
    for key in ("episodes", "seconds", "bare_sdpa_seconds"):
        if key in out:
            out[key] = sum(r[key] for r in rounds)
    out["episodes_per_s"] = out["episodes"] / out["seconds"]
    if "bare_sdpa_seconds" in out:
        out["whole_env_over_bare_sdpa"] = out["seconds"] / out["bare_sdpa_seconds"]
    out["rounds"] = [{key: r[key] for key in ("episodes", "seconds", "episodes_per_s", "whole_env_over_bare_sdpa")
                      if key in r} for r in rounds]
    return out


def _spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def format_table(results: dict[str, dict[str, Any]], n: int) -> str:
    labels = {"single": "single env", "sync": f"SyncVectorEnv({n})", "batched": f"batched vector env ({n})",
              "batched-scoring": "  + endings in one forward", "ray": f"Ray ({n} workers)"}
    base = results.get("single", {}).get("episodes_per_s")
    counted = any(r.get("ops_per_row_step") is not None for r in results.values())
    lines = [f"{'runner':<26} {'episodes':>8} {'episodes/s':>11} {'x single':>9} {'threads':>8}"
             + (f" {'ops/row-step':>13}" if counted else "")]
    single_rounds = results.get("single", {}).get("rounds", [])
    rounds = len(single_rounds) > 1
    if rounds:
        lines[0] += f" {'x single by round':>18}"
    for name, r in results.items():
        ratio = f"{r['episodes_per_s'] / base:>9.2f}" if base else f"{'':>9}"
        ops = r.get("ops_per_row_step")
        line = (f"{labels[name]:<26} {r['episodes']:>8} {r['episodes_per_s']:>11.3f} {ratio} {r['threads']:>8}"
                + (f" {'' if ops is None else f'{ops:.0f}':>13}" if counted else ""))
        if rounds and len(r.get("rounds", [])) == len(single_rounds):
            paired = zip(r["rounds"], single_rounds, strict=True)
            line += f" {_spread([a['episodes_per_s'] / b['episodes_per_s'] for a, b in paired]):>18}"
        lines.append(line)
    if "single" in results:
        whole = results["single"]
        spread = _spread([r["whole_env_over_bare_sdpa"] for r in single_rounds]) if rounds else ""
        lines.append(f"\nwhole env / bare SDPA forward (single env): {whole['whole_env_over_bare_sdpa']:.2f}x"
                     + (f" (by round: {spread})" if rounds else ""))
    if rounds:
        lines.append(f"(the single and batched rows ran in {len(single_rounds)} rounds of the same rows, in turn; "
                     "'by round': the lowest-highest of the rounds' ratios)")
    gain = results.get("batched", {}).get("bare_batching")
    if gain:
        lines.append(f"bare SDPA forward, {gain['rows']} rows in one batch / one at a time ({gain['blocks']} blocks each): "
                     f"{gain['gain']:.2f}x (the ceiling of the batched env's gain on this machine)")
    if "ray" in results:
        lines.append(f"Ray startup (Ray, actors, models, first episodes): {results['ray']['startup_seconds']:.1f} s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="embedded", help="model spec for envs.model.load_model")
    p.add_argument("--episodes", type=int, default=8, help="measured episodes per runner")
    p.add_argument("--num-envs", type=int, default=2, help="N: vector env size and Ray workers")
    p.add_argument("--bits", type=int, default=4, help="fixed bit-width every step commits")
    p.add_argument("--shots", type=int, default=None, help="override the env's shots (default config: 5)")
    p.add_argument("--interval", type=int, default=None, help="override the env's block length (default 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the single and vector env (default: torch's choice) and of each Ray "
                        "worker (default 1); on a busy machine more threads than free cores slow torch down a lot")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which runners to measure")
    p.add_argument("--rounds", type=int, default=3,
                   help="the single and batched runners take the rows in this many parts, each part by every runner "
                        "in turn, so a slow spell of a shared machine hits them alike (at most episodes / num-envs)")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the torch operators per row-step (one env step or reset of one row) of the "
                        "single and batched envs, in one more, untimed pass: on a GPU each is a kernel launch")
    p.add_argument("--out", type=Path, default=Path("runs/bench_throughput.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.episodes < 1 or args.num_envs < 1 or args.rounds < 1:
        raise ValueError("--episodes, --num-envs and --rounds must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"references of {store_references(args)} held-out rows stored; every runner reads them")
    results = run_rounds(args)
    print(format_table(results, args.num_envs))
    write_json(args.out, {"config": vars(args) | {"out": str(args.out)}, "results": results})
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
