"""The protect-tokens probe's table: every variant on the pool items all variants ran, with paired 95% CIs
(Student t) against 2-bit + sinks and against fixed K3V2 (read from ../pool_fixed/records.jsonl, the same rows).

Run from the repository root: ``python results/passkey_study/protect_tokens/summary.py``.
"""
import collections
import glob
import json

import numpy as np
from scipy import stats

HERE = "results/passkey_study/protect_tokens"


def ci(x: np.ndarray, fmt: str) -> str:
    if not x.any():  # a variant against itself
        return "—"
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return f"{x.mean():{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def column(records: dict[int, dict], key: str, on: list[int]) -> np.ndarray:
    return np.array([records[r][key] for r in on], dtype=float)


def main() -> None:
    by: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for path in sorted(glob.glob(f"{HERE}/records_[0-9]*.jsonl")):
        for line in open(path):
            r = json.loads(line)
            by[r["policy"]][r["row"]] = r
    rows = sorted(set.intersection(*(set(v) for v in by.values())))
    k3v2 = {}
    for line in open("results/passkey_study/pool_fixed/records.jsonl"):
        r = json.loads(line)
        if r["policy"] == "fixed:k3v2":
            k3v2[r["row"]] = {**r, "correct": r["correct_norm"]}
    both = [r for r in rows if r in k3v2]  # pool_fixed ran the first 24 pool items

    print(f"{len(rows)} pool items; the K3V2 columns on the first {len(both)} (pool_fixed's)\n")
    print("| variant | avg bits | acc | Δ log-lik vs fp16 | Δ log-lik vs 2+s4 | Δ log-lik vs K3V2 | Δacc vs K3V2 |")
    print("|---|---|---|---|---|---|---|")
    for name, records in [*by.items(), ("fixed:k3v2 (pool_fixed)", k3v2)]:
        on = both if records is k3v2 else rows
        ll = column(records, "loglik_delta", on)
        print(f"| {name} | {column(records, 'avg_bits', on).mean():.2f} | {column(records, 'correct', on).mean():.3f} | "
              f"{ll.mean():+.2f} | {ci(ll - column(by['2+s4'], 'loglik_delta', on), '+.2f')} | "
              f"{ci(column(records, 'loglik_delta', both) - column(k3v2, 'loglik_delta', both), '+.2f')} | "
              f"{ci(column(records, 'correct', both) - column(k3v2, 'correct', both), '+.3f')} |")


if __name__ == "__main__":
    main()
