"""Rotated against unrotated fixed settings on the same HellaSwag pool rows (nothing re-run): reads this folder's
records (pool_k.yaml, pool_kv.yaml) and the frontier's (results/frontier/evaluate), pairs them by row.

Run from the repository root: python results/frontier/rotated/table.py  (-> table.md)
"""
from pathlib import Path

from experiments.stats import records_by_policy, rows_mean, rows_paired_ci

HERE = Path(__file__).parent
records = records_by_policy([Path("results/frontier/evaluate/records.jsonl"), HERE / "records.jsonl"])


def mean(policy: str, key: str, rows: list[int]) -> float:
    return rows_mean(records, policy, key, rows)


def ci(a: str, b: str, key: str, rows: list[int], scale: float = 1.0) -> str:
    return rows_paired_ci(records, a, b, key, rows).text(scale)


lines = ["HellaSwag 5-shot, pool rows, paired by row (the rows every listed variant of a setting ran); acc_norm "
         "differences in points, gold log-lik in nats.", ""]
# the frontier ran every setting on its first 32 pool rows (round 1) and the survivors on its first 200 (round 2)
for name, rows in (("round 1's 32", sorted(records["fixed:k3v2+s4"])),):
    lines += [f"### {name} pool rows", "",
              "| setting | avg bits | acc_norm: plain / keys rotated / keys+values rotated | Δ log-lik vs fp16: plain / rot / "
              "rotkv | rot minus plain: Δacc_norm, Δ log-lik | rotkv minus plain: Δacc_norm, Δ log-lik |",
              "|---|---|---|---|---|---|",
              f"| fp16 | 16 | {mean('fp16', 'correct_norm', rows):.3f} | — | — | — |"]
    for setting in ("2+s4", "k3v2+s4", "k4v2+s4", "4+s4"):
        plain, rot, rotkv = f"fixed:{setting}", f"rot-{setting}", f"rotkv-{setting}"
        have = [p for p in (plain, rot, rotkv) if all(r in records[p] for r in rows)]
        if plain not in have or len(have) < 2:
            continue
        acc = " / ".join(f"{mean(p, 'correct_norm', rows):.3f}" if p in have else "—" for p in (plain, rot, rotkv))
        dll = " / ".join(f"{mean(p, 'loglik_delta', rows):+.2f}" if p in have else "—" for p in (plain, rot, rotkv))
        diffs = [f"{ci(p, plain, 'correct_norm', rows, 100)}, {ci(p, plain, 'loglik_delta', rows)}" if p in have else "—"
                 for p in (rot, rotkv)]
        lines.append(f"| {setting} | {mean(plain, 'avg_bits', rows):.2f} | {acc} | {dll} | {diffs[0]} | {diffs[1]} |")
    lines.append("")
text = "\n".join(lines) + "\n"
(HERE / "table.md").write_text(text)
print(text)
