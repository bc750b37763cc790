"""Check that kvgym's evaluator reproduces lm-evaluation-harness on the same HellaSwag items.

    python -m experiments.lm_eval_check.compare subset --limit 200          # writes the task's JSONL
    python -m experiments.lm_eval_check.compare compare --ours runs/lm_eval_check/ours.json \
        --lm-eval-samples <lm-eval output>/samples_hellaswag_local_*.jsonl

See README.md beside this file for the full recipe.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from envs.hellaswag import load_hellaswag, split_items
from experiments.io import read_jsonl, write_jsonl

SUBSET = Path("runs/lm_eval_check/hellaswag_eval200.jsonl")


def write_subset(limit: int, eval_size: int, seed: int, out: Path) -> None:
    """The first ``limit`` items of the held-out split, in the shared schema, in eval order."""
    items = split_items(load_hellaswag(), eval_size, seed=seed).eval[:limit]
    write_jsonl(out, [{"row": it.row, "activity_label": it.activity_label, "ctx": it.ctx,
                       "endings": list(it.endings), "label": it.label} for it in items])
    print(f"wrote {len(items)} items to {out}")


def compare(ours_path: Path, samples_path: Path) -> None:
    ours = json.loads(ours_path.read_text())["records"]
    theirs = sorted(read_jsonl(samples_path), key=lambda s: s["doc_id"])
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} kvgym records vs {len(theirs)} lm-eval samples: not the same items")
    diffs, acc_agree, norm_agree = [], 0, 0
    for mine, s in zip(ours, theirs, strict=True):
        if mine["row"] != s["doc"]["row"]:
            raise ValueError(f"item order differs: row {mine['row']} vs {s['doc']['row']}")
        lls = [float(r[0]) for r in s["filtered_resps"]]
        diffs.append(np.max(np.abs(np.array(lls) - np.array(mine["scores"]))))
        acc_agree += float(mine["correct"]) == s["acc"]
        norm_agree += float(mine["correct_norm"]) == s["acc_norm"]
    n = len(ours)
    print(f"items {n}")
    print(f"kvgym : acc {np.mean([r['correct'] for r in ours]):.4f}  acc_norm {np.mean([r['correct_norm'] for r in ours]):.4f}")
    print(f"lm-eval: acc {np.mean([s['acc'] for s in theirs]):.4f}  acc_norm {np.mean([s['acc_norm'] for s in theirs]):.4f}")
    print(f"item-level agreement: acc {acc_agree}/{n}, acc_norm {norm_agree}/{n}; max |loglik diff| {max(diffs):.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description="kvgym vs lm-evaluation-harness on the same HellaSwag items")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset", help="write the eval items lm-eval will score")
    s.add_argument("--limit", type=int, default=200)
    s.add_argument("--eval-size", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=SUBSET)
    c = sub.add_parser("compare", help="compare per-item results")
    c.add_argument("--ours", type=Path, required=True, help="JSON written by experiments.eval_fp16")
    c.add_argument("--lm-eval-samples", type=Path, required=True, help="lm-eval --log_samples JSONL")
    args = p.parse_args()
    if args.cmd == "subset":
        write_subset(args.limit, args.eval_size, args.seed, args.out)
    else:
        compare(args.ours, args.lm_eval_samples)


if __name__ == "__main__":
    main()
