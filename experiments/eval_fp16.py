"""Full-precision accuracy of a model on a task (HellaSwag by default): the reference every quantized policy is compared to.

    python -m experiments.eval_fp16 --model embedded --shots 0 --limit 200 --out runs/eval_fp16.json
    python -m experiments.eval_fp16 --task passkey --task-options '{"length": 1024}' --limit 20

Scores exactly as lm-evaluation-harness (see envs/scoring.py), on the held-out eval split of the
task (``envs.tasks``; HellaSwag: envs.hellaswag.split_items), with shots drawn from the disjoint pool
(seeded per item) where the task has shots: the prompts the env builds for the same rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from envs.hellaswag import item_rng, load_hellaswag
from envs.scoring import encode_pair, score_requests
from envs.tasks import Task, TaskItem, make_task
from experiments.io import seed_everything, write_json
from experiments.stats import proportion_ci

__all__ = ["evaluate_fp16", "item_rng", "main"]


def _item_requests(tokenizer, task: Task, item: TaskItem, shots: Sequence[TaskItem]):
    prompt = task.context(item, shots)
    return [encode_pair(tokenizer, prompt, cont) for cont in task.continuations(item)]


def evaluate_fp16(
    model,
    tokenizer,
    items: Sequence[TaskItem],
    pool: Sequence[TaskItem],
    shots: int,
    seed: int,
    progress: bool = True,
    batch_items: int = 1,
    task: Task | None = None,
) -> dict:
    """Score ``items`` of ``task`` (default HellaSwag; a generated task must be loaded) with ``shots``
    solved examples each where it has shots; return ``{"records": [...], "summary": {...}}``."""
    task = make_task("hellaswag") if task is None else task
    if batch_items < 1:
        raise ValueError(f"batch_items must be >= 1, got {batch_items}")
    if not items:
        raise ValueError("no items to evaluate")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=f"fp16 {shots}-shot", unit="item", disable=not progress)
    for lo in range(0, len(items), batch_items):
        chunk = items[lo : lo + batch_items]
        per_item = [
            _item_requests(tokenizer, task, it, task.shots(it, pool, shots, item_rng(seed, it.row))) for it in chunk
        ]
        flat = score_requests(model, [req for reqs in per_item for req in reqs], pad_id=pad_id)
        offset = 0
        for it, reqs in zip(chunk, per_item, strict=True):
            scores = flat[offset : offset + len(reqs)]
            offset += len(reqs)
            pred, pred_norm = task.choose(it, scores)
            records.append({
                "row": it.row, "scores": scores, "pred": pred, "pred_norm": pred_norm, "gold": it.label,
                "correct": pred == it.label, "correct_norm": pred_norm == it.label,
                "prompt_tokens": len(reqs[0][0]),
            })
        bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - start
    # Wilson intervals, as experiments.evaluate reports accuracies, so the two can be read side by side
    acc = proportion_ci(sum(r["correct"] for r in records), len(records))
    acc_norm = proportion_ci(sum(r["correct_norm"] for r in records), len(records))
    summary = {
        "items": len(records), "shots": shots, "seed": seed,
        "acc": acc.mean, "acc_ci95": [acc.lo, acc.hi],
        "acc_norm": acc_norm.mean, "acc_norm_ci95": [acc_norm.lo, acc_norm.hi],
        "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in records])),
        "seconds_per_item": elapsed / len(records),
    }
    return {"summary": summary, "records": records}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=str, default="embedded", help="model spec for envs.model.load_model")
    p.add_argument("--dtype", type=str, default="float32", help="weights dtype (float32 on CPU)")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--data", type=str, default=None, help="HellaSwag JSONL or 'Rowan/hellaswag' (default: shared file)")
    p.add_argument("--task", type=str, default="hellaswag", help="task name (envs.tasks)")
    p.add_argument("--task-options", type=json.loads, default={}, help="the task's options as JSON")
    p.add_argument("--shots", type=int, default=0, help="solved examples before each item")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N eval items")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out split size")
    p.add_argument("--seed", type=int, default=0, help="split and shot seed")
    p.add_argument("--batch-items", type=int, default=1, help="items scored per forward pass")
    p.add_argument("--out", type=Path, default=Path("runs/eval_fp16.json"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    from envs.model import load_model

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    task = make_task(args.task, args.task_options)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    limit = getattr(model.config, "max_position_embeddings", 1 << 30)
    splits = task.split(task.load(load_hellaswag(args.data), tokenizer, limit), args.eval_size, args.seed)
    items = splits.eval[: args.limit] if args.limit is not None else splits.eval
    result = evaluate_fp16(
        model, tokenizer, items, splits.pool, args.shots, args.seed,
        progress=not args.no_progress, batch_items=args.batch_items, task=task,
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"config": config, **result})
    s = result["summary"]
    print(
        f"{s['items']} items, {args.shots}-shot: acc {s['acc']:.4f} [{s['acc_ci95'][0]:.3f}, {s['acc_ci95'][1]:.3f}]  "
        f"acc_norm {s['acc_norm']:.4f} [{s['acc_norm_ci95'][0]:.3f}, {s['acc_norm_ci95'][1]:.3f}]  "
        f"{s['seconds_per_item']:.3f} s/item -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
