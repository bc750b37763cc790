"""How fast is KVPrecision-v0, and where does a step's time go?

    python -m experiments.bench_env --model embedded --episodes 4 --out runs/bench_env.json

Runs whole episodes of the env (default config: 5 shots, blocks of 64 tokens, default features
including attention variance) and, interleaved block by block, a *bare* forward of exactly the
same blocks: ``model(input_ids, cache=DynamicCache())``, once with SDPA attention and
once with eager attention. Measuring both side by side in one run keeps
the ratios meaningful on a shared, noisy machine, where absolute milliseconds are not.

A step's time is split into: the env's own forward (eager attention, attention maps returned,
our mixed-precision cache; of which dequantizing the committed cache), committing/quantizing the
block, features, reward and bookkeeping (the rest of ``step``), and, amortised over the episode's
steps, the full-precision reference pass of ``reset`` and the terminal scoring of the endings.
The headline is ``own work / bare forward``: everything a step does besides running the model,
relative to the SDPA forward of the same block (target <= 15%).

The split is measured by wrapping the env's internal methods for the duration of the run; the
env itself is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.fixed import FixedBitsPolicy
from agents.rollout import Episode, rollout
from envs.cache_kwarg import with_cache
from experiments.io import write_json

TARGET_RATIO = 0.15

__all__ = ["PhaseTimer", "bare_forward_ms", "run_benchmark", "main"]


class PhaseTimer:
    """Wall time per named phase, from wrapped callables; nested phases are charged to the outermost.

    Charging to the outermost phase means the forward and ending scoring run *inside* the reference
    pass count as reference time, not as a step's forward or terminal scoring.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._active: list[str] = []

    def reset(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out

    def wrap(self, name: str, fn: Callable, within: str | None = None) -> Callable:
        """``within``: a sub-phase, counted only while that phase is the open one (dequantization
        inside the step's forward), and not charged to any phase of its own."""
        nested = within is not None

        def timed(*args, **kwargs):
            if (self._active and not nested) or (nested and self._active[-1:] != [within]):
                return fn(*args, **kwargs)
            if not nested:
                self._active.append(name)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - t0
                if not nested:
                    self._active.pop()

        return timed


@contextlib.contextmanager
def instrument(env) -> Iterator[PhaseTimer]:
    """Wrap the env's phases (instance attributes and two cache methods) for the duration of the block."""
    from quant.kv_cache import MixedPrecisionKVCache, MixedPrecisionLayer

    timer = PhaseTimer()
    patched_instance = {
        "_reference": timer.wrap("reference", env._reference),
        "_forward": timer.wrap("forward", env._forward),
        "_score_endings": timer.wrap("ending_scoring", env._score_endings),
    }
    # the layer method that dequantizes the committed cache inside every forward (quant.kv_cache)
    dequant = "_assemble" if "_assemble" in MixedPrecisionLayer.__dict__ else "committed"
    originals_cls = [(MixedPrecisionKVCache, "commit"), (MixedPrecisionLayer, dequant)]
    saved_cls = [(cls, name, cls.__dict__[name]) for cls, name in originals_cls]
    feature_observe = env.feature_set.observe
    try:
        for name, fn in patched_instance.items():
            setattr(env, name, fn)
        env.feature_set.observe = timer.wrap("features", feature_observe)
        MixedPrecisionKVCache.commit = timer.wrap("commit", MixedPrecisionKVCache.commit)
        setattr(MixedPrecisionLayer, dequant, timer.wrap("dequant", getattr(MixedPrecisionLayer, dequant), within="forward"))
        yield timer
    finally:
        for name in patched_instance:
            env.__dict__.pop(name, None)
        env.feature_set.__dict__.pop("observe", None)
        for cls, name, fn in saved_cls:
            setattr(cls, name, fn)


@torch.inference_mode()
def bare_forward_ms(model, cache, block_ids: Sequence[int] | Sequence[Sequence[int]], repeats: int = 1) -> float:
    """Median ms of a plain ``model(block, cache=cache)``; the cache ends holding the block.

    ``block_ids``: one row of token ids, or several rows of equal length run as one batch (the cache's
    batch then has as many rows). Between repeats the cache is cropped back, so every repeat runs
    against the same prefix.
    """
    rows = [list(r) for r in block_ids] if len(block_ids) and isinstance(block_ids[0], Sequence) else [list(block_ids)]
    ids = torch.tensor(rows, device=model.device)
    times = []
    for r in range(repeats):
        if r:
            cache.crop(-ids.shape[1])  # negative: drop the block just added
        t0 = time.perf_counter()
        model(input_ids=ids, **with_cache(model, cache), use_cache=True)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)  # the GPU runs asynchronously: time the work, not the launch
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _run_episode(env, timer: PhaseTimer, row: int, policy, bare_models: dict, repeats: int) -> dict[str, Any]:
    """One episode at fixed bits, each block's bare forwards run right after the env ran it.

    Interleaving block by block means a burst of load from other processes hits the env's step
    and the bare forward it is compared with alike. Step 0 is ``reset``; phase times in ms.
    """
    from transformers import DynamicCache

    prompt_ids = env.episode_inputs(row)[1]
    interval = env.config.interval
    caches = {impl: DynamicCache(config=m.config) for impl, m in bare_models.items()}
    bare: dict[str, list[float]] = {impl: [] for impl in bare_models}

    def run_bare(block: int) -> None:
        ids = prompt_ids[block * interval : (block + 1) * interval]
        for impl, model in bare_models.items():
            bare[impl].append(bare_forward_ms(model, caches[impl], ids, repeats))

    steps: list[dict[str, float]] = []

    def after(episode: Episode) -> None:  # after reset and every step, outside the env's timed calls
        i = len(episode)
        phases = {k: 1000 * v for k, v in timer.reset().items()}
        steps.append({"wall": episode.wall_ms[i], **({"terminal": float(episode.done)} if i else {}), **phases})
        if not episode.done:
            run_bare(i)

    rollout(env, policy, options={"row": row}, callback=after)
    return {"row": row, "prompt_tokens": len(prompt_ids), "steps": steps, "bare_ms": bare}


def _summarise(episodes: list[dict]) -> dict[str, Any]:
    """Per-step medians and episode totals; ratios from totals over every measured step."""
    keys = ("forward", "dequant", "commit", "features", "bookkeeping", "reference", "ending_scoring", "wall")
    per_step: dict[str, list[float]] = defaultdict(list)  # non-terminal steps (each runs one block)
    totals: dict[str, float] = defaultdict(float)
    step_ratios: list[float] = []  # own work / bare SDPA forward of the same block, per non-terminal step
    n_steps = 0
    for ep in episodes:
        for i, s in enumerate(ep["steps"]):
            s = {k: s.get(k, 0.0) for k in (*keys, "terminal")}
            s["bookkeeping"] = s["wall"] - s["forward"] - s["commit"] - s["features"] - s["reference"] - s[
                "ending_scoring"
            ]
            if i > 0:
                n_steps += 1
            for k in keys:
                totals[k] += s[k]
            if i > 0 and not s["terminal"]:
                for k in keys:
                    per_step[k].append(s[k])
                step_ratios.append((s["commit"] + s["features"] + s["bookkeeping"]) / ep["bare_ms"]["sdpa"][i])
    impls = episodes[0]["bare_ms"].keys()
    bare_total = {impl: float(sum(sum(ep["bare_ms"][impl]) for ep in episodes)) for impl in impls}
    bare_steps = {impl: [ms for ep in episodes for ms in ep["bare_ms"][impl][1:]] for impl in impls}
    own = totals["commit"] + totals["features"] + totals["bookkeeping"]
    amortised = own + totals["reference"] + totals["ending_scoring"]
    result = {
        "episodes": len(episodes),
        "steps": n_steps,
        "blocks": sum(len(ep["steps"]) - 1 for ep in episodes),
        "median_ms_per_step": {k: statistics.median(v) for k, v in per_step.items()},
        "bare_median_ms_per_block": {impl: statistics.median(v) for impl, v in bare_steps.items()},
        "total_ms": dict(totals),
        "bare_total_ms": bare_total,
        "ms_per_step_amortised": {
            "reference": totals["reference"] / n_steps,
            "ending_scoring": totals["ending_scoring"] / n_steps,
        },
        "ratios": {
            "own_work_over_bare_sdpa": own / bare_total["sdpa"],
            "own_work_over_bare_sdpa_median_step": statistics.median(step_ratios),
            "own_work_over_bare_eager": own / bare_total["eager"],
            "env_forward_over_bare_sdpa": totals["forward"] / bare_total["sdpa"],
            "env_forward_over_bare_eager": totals["forward"] / bare_total["eager"],
            "dequant_share_of_env_forward": totals["dequant"] / totals["forward"],
            "own_plus_reference_and_scoring_over_bare_sdpa": amortised / bare_total["sdpa"],
            "env_total_over_bare_sdpa": totals["wall"] / bare_total["sdpa"],
        },
        "env_steps_per_s": n_steps / (totals["wall"] / 1000),
        "env_tokens_per_s": sum(ep["prompt_tokens"] for ep in episodes) / (totals["wall"] / 1000),
    }
    result["target_ratio"] = TARGET_RATIO
    result["meets_target"] = result["ratios"]["own_work_over_bare_sdpa"] <= TARGET_RATIO
    return result


def run_benchmark(
    model_spec: str = "embedded",
    episodes: int = 4,
    warmup: int = 1,
    repeats: int = 2,
    bits: int = 4,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure ``episodes`` env episodes (after ``warmup``) and the bare forwards of the same blocks.

    ``repeats`` bare passes per implementation and block; their median is kept, so one
    descheduled pass does not skew a block.
    """
    from envs.kv_precision import KVPrecisionEnv
    from envs.model import load_model

    env = KVPrecisionEnv(model=model_spec, split="eval", **(overrides or {}))
    if bits not in env.bits:
        raise ValueError(f"--bits {bits} is not in the env's bits {env.bits}")
    policy = FixedBitsPolicy(env.observation_names, env.bits, bits)
    sdpa, _ = load_model(model_spec, dtype=env.model.dtype, device=env.model.device, attn_implementation="sdpa")
    models = {"sdpa": sdpa, "eager": env.model}
    rows = [item.row for item in env.items[: warmup + episodes]]
    if len(rows) < warmup + episodes:
        raise ValueError(f"the eval split has only {len(env.items)} items; lower --episodes")

    measured: list[dict] = []
    with instrument(env) as timer:
        for i, row in enumerate(tqdm(rows, desc="bench_env", unit="episode", disable=not progress)):
            ep = _run_episode(env, timer, row, policy, models, repeats)
            if i >= warmup:
                measured.append(ep)
    summary = _summarise(measured)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(env.config).items()}
    env.close()
    return {
        "config": {"env": config, "bits": bits, "episodes": episodes, "warmup": warmup, "repeats": repeats,
                   "torch_threads": torch.get_num_threads()},
        "summary": summary,
        "episodes": measured,
    }


def format_table(summary: dict[str, Any]) -> str:
    med, amort, r = summary["median_ms_per_step"], summary["ms_per_step_amortised"], summary["ratios"]
    bare = summary["bare_median_ms_per_block"]
    rows = [
        ("bare forward, SDPA + DynamicCache", bare["sdpa"]),
        ("bare forward, eager + DynamicCache", bare["eager"]),
        ("env forward (eager, attn maps, our cache)", med["forward"]),
        ("  of which: dequantize committed cache", med["dequant"]),
        ("commit / quantize block", med["commit"]),
        ("features", med["features"]),
        ("reward + bookkeeping", med["bookkeeping"]),
        ("reference pass (amortised per step)", amort["reference"]),
        ("terminal ending scoring (amortised per step)", amort["ending_scoring"]),
        ("whole step (wall)", med["wall"]),
    ]
    lines = [f"{'phase':<46} {'ms/step (median)':>16}"]
    lines += [f"{name:<46} {ms:>16.2f}" for name, ms in rows]
    lines += [
        "",
        f"env steps/s: {summary['env_steps_per_s']:.2f}   prompt tokens/s: {summary['env_tokens_per_s']:.1f}   "
        f"({summary['episodes']} episodes, {summary['steps']} steps)",
        f"own work / bare SDPA forward:    {r['own_work_over_bare_sdpa']:.1%}  (target <= {TARGET_RATIO:.0%}: "
        f"{'met' if summary['meets_target'] else 'MISSED'})",
        f"  (median over steps of the per-step ratio: {r['own_work_over_bare_sdpa_median_step']:.1%})",
        f"own work / bare eager forward:   {r['own_work_over_bare_eager']:.1%}",
        f"env forward / bare SDPA forward: {r['env_forward_over_bare_sdpa']:.2f}x  "
        f"(/ eager: {r['env_forward_over_bare_eager']:.2f}x; dequant {r['dequant_share_of_env_forward']:.1%} of it)",
        f"own + reference + scoring / bare SDPA: {r['own_plus_reference_and_scoring_over_bare_sdpa']:.1%}   "
        f"whole env / bare SDPA: {r['env_total_over_bare_sdpa']:.2f}x",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="embedded", help="model spec for envs.model.load_model")
    p.add_argument("--episodes", type=int, default=4, help="measured episodes (distinct eval items)")
    p.add_argument("--warmup", type=int, default=1, help="episodes run first and not measured")
    p.add_argument("--repeats", type=int, default=2, help="bare forward passes per implementation and block (median kept)")
    p.add_argument("--bits", type=int, default=4, help="fixed bit-width every step commits")
    p.add_argument("--shots", type=int, default=None, help="override the env's shots (default config: 5)")
    p.add_argument("--interval", type=int, default=None, help="override the env's block length (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="override the env's device (default 'auto': CUDA when visible)")
    p.add_argument("--reference-store", default=None,
                   help="'off': compute every reference pass (no store); a folder: that store "
                        "(default: the env's store, $KVGYM_CACHE/references)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_env.json"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.episodes < 1 or args.warmup < 0 or args.repeats < 1:
        raise ValueError("--episodes and --repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    overrides = {
        k: v for k, v in (("shots", args.shots), ("interval", args.interval), ("device", args.device)) if v is not None
    }
    if args.reference_store is not None:
        overrides["reference_store"] = False if args.reference_store == "off" else args.reference_store
    result = run_benchmark(args.model, args.episodes, args.warmup, args.repeats, args.bits, overrides,
                           progress=not args.no_progress)
    result["config"]["model"] = args.model
    print(format_table(result["summary"]))
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
