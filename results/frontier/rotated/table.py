"""Rotated against unrotated fixed settings on the same HellaSwag pool rows (nothing re-run): reads this folder's
records (pool_k.yaml, pool_kv.yaml) and the frontier's (results/frontier/evaluate), pairs them by row.

Run from the repository root: python results/frontier/rotated/table.py  (-> table.md)
"""
import json
from collections import defaultdict
from pathlib import Path

from experiments.stats import paired_diff_ci

HERE = Path(__file__).parent
records: dict[str, dict[int, dict]] = defaultdict(dict)
for path in (Path("results/frontier/evaluate/records.jsonl"), HERE / "records.jsonl"):
    for line in path.open():
        r = json.loads(line)
        records[r["policy"]][r["row"]] = r
rows = sorted(next(iter(records[p] for p in records if p.startswith("rot-"))))


def mean(policy: str, key: str) -> float:
    return sum(records[policy][r][key] for r in rows) / len(rows)


def ci(a: str, b: str, key: str, scale: float = 1.0) -> str:
    d = paired_diff_ci([records[a][r][key] for r in rows], [records[b][r][key] for r in rows])
    return f"{scale * d.mean:+.2f} [{scale * d.lo:+.2f}, {scale * d.hi:+.2f}]"


lines = [f"HellaSwag 5-shot, {len(rows)} pool rows, paired by row; acc_norm in points, gold log-lik in nats.", "",
         "| setting | avg bits | acc_norm: plain / keys rotated / keys+values rotated | Δ log-lik vs fp16: plain / rot / rotkv "
         "| rot minus plain: Δacc_norm, Δ log-lik | rotkv minus plain: Δacc_norm, Δ log-lik |",
         "|---|---|---|---|---|---|"]
lines.append(f"| fp16 | 16 | {mean('fp16', 'correct_norm'):.3f} | — | — | — |")
for setting in ("2+s4", "k3v2+s4", "k4v2+s4", "4+s4"):
    plain, rot, rotkv = f"fixed:{setting}", f"rot-{setting}", f"rotkv-{setting}"
    have = [p for p in (plain, rot, rotkv) if all(r in records[p] for r in rows)]
    acc = " / ".join(f"{mean(p, 'correct_norm'):.3f}" if p in have else "—" for p in (plain, rot, rotkv))
    dll = " / ".join(f"{mean(p, 'loglik_delta'):+.2f}" if p in have else "—" for p in (plain, rot, rotkv))
    diffs = [f"{ci(p, plain, 'correct_norm', 100)}, {ci(p, plain, 'loglik_delta')}" if p in have and plain in have else "—"
             for p in (rot, rotkv)]
    lines.append(f"| {setting} | {mean(have[0], 'avg_bits'):.2f} | {acc} | {dll} | {diffs[0]} | {diffs[1]} |")
text = "\n".join(lines) + "\n"
(HERE / "table.md").write_text(text)
print(text)
