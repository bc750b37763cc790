"""Searched static schedules against the fixed settings that fit the same budget, on the frontier's first 200
pool rows (nothing here was fitted on these rows; the schedules were searched on pool rows 200-223).

Reads the frontier's records (fp16, unrotated fixed settings), the rotated fixed settings
(results/frontier/rotated) and this folder's evaluations (pool_b3.0.yaml, pool_b2.5.yaml), pairs them by row.
Run from the repository root: python results/study_v2/search/table.py  (-> table.md)
"""
import json
from collections import defaultdict
from pathlib import Path

from experiments.stats import paired_diff_ci

HERE = Path(__file__).parent
records: dict[str, dict[int, dict]] = defaultdict(dict)
paths = [Path("results/frontier/evaluate/records.jsonl"), Path("results/frontier/rotated/records.jsonl")]
paths += sorted(HERE.glob("pool_b*/records.jsonl"))
for path in paths:
    for line in path.open():
        r = json.loads(line)
        records[r["policy"]][r["row"]] = r

BUDGETS = {  # the fixed settings at or under each budget that the frontier ran on these rows
    3.0: ["fixed:k4v2", "rotkv-k4v2", "rotkv-k3v2+s4", "rotkv-k3v2", "rotkv-2+s4"],
    2.5: ["rotkv-k3v2", "rotkv-2+s4", "fixed:2+s4"],
}


def mean(policy: str, key: str, rows: list[int]) -> float:
    return sum(records[policy][r][key] for r in rows) / len(rows)


def ci(a: str, b: str, key: str, rows: list[int], scale: float = 1.0) -> str:
    d = paired_diff_ci([records[a][r][key] for r in rows], [records[b][r][key] for r in rows])
    return f"{scale * d.mean:+.2f} [{scale * d.lo:+.2f}, {scale * d.hi:+.2f}]"


lines = ["HellaSwag 5-shot, pool rows, paired by row; acc_norm differences in points, gold log-lik in nats "
         "(against the fp16 pass of the same prompt).", ""]
for budget, fixed in BUDGETS.items():
    static = f"static-b{budget}"
    if not records[static]:
        continue
    rows = sorted(r for r in records[static] if all(r in records[p] for p in ["fp16", *fixed]))
    lines += [f"### budget {budget} ({len(rows)} rows)", "",
              "| policy | avg bits (max) | acc_norm | Δ log-lik vs fp16 | static minus it: Δacc_norm | static minus it: "
              "Δ log-lik |", "|---|---|---|---|---|---|"]
    for p in ["fp16", static, *fixed]:
        most = max(records[p][r]["avg_bits"] for r in rows)
        diff = "— | —" if p == static else (f"{ci(static, p, 'correct_norm', rows, 100)} | "
                                            f"{ci(static, p, 'loglik_delta', rows)}")
        lines.append(f"| {p} | {mean(p, 'avg_bits', rows):.2f} ({most:.2f}) | {mean(p, 'correct_norm', rows):.3f} | "
                     f"{mean(p, 'loglik_delta', rows):+.2f} | {diff} |")
    lines.append("")
text = "\n".join(lines) + "\n"
(HERE / "table.md").write_text(text)
print(text)
