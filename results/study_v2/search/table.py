"""Searched static schedules and learned policies against the fixed settings that fit the same budget, on the
frontier's first 200 pool rows (the schedules were searched on pool rows 200-223; PPO trained, and the MLP's oracle
teacher ran, on the pool episode set train-0-200, whose rows are left out here, so nothing is scored on a row it was
fitted on).

Reads the frontier's records (fp16, unrotated fixed settings), the rotated fixed settings
(results/frontier/rotated), this folder's evaluations (pool_b3.0.yaml, pool_b2.5.yaml) and PPO's
(../ppo/pool_b*.yaml) and the MLP's (../mlp/pool_b*.yaml), pairs them by row.
Run from the repository root: python results/study_v2/search/table.py  (-> table.md)
"""
from pathlib import Path

import yaml

from envs.episodes import episode_set
from envs.hellaswag import default_hellaswag_path, load_hellaswag, split_items
from experiments.stats import records_by_policy, rows_mean, rows_paired_ci

HERE = Path(__file__).parent
paths = [Path("results/frontier/evaluate/records.jsonl"), Path("results/frontier/rotated/records.jsonl")]
paths += sorted(HERE.glob("pool_b*/records.jsonl")) + sorted((HERE.parent / "ppo").glob("pool_b*/records.jsonl"))
paths += sorted((HERE.parent / "mlp").glob("pool_b*/records.jsonl"))
records = records_by_policy(paths)

BUDGETS = {  # the fixed settings at or under each budget that the frontier ran on these rows
    3.0: ["fixed:k4v2", "rotkv-k4v2", "rotkv-k3v2+s4", "rotkv-k3v2", "rotkv-2+s4"],
    2.5: ["rotkv-k3v2", "rotkv-2+s4", "fixed:2+s4"],
}
PPO_ENV = yaml.safe_load((HERE.parent / "ppo" / "train_b3.0.yaml").read_text())["env"]  # the episode set it trained on
PPO_TRAINED_ON = set(episode_set(PPO_ENV["episodes"], split_items(load_hellaswag(default_hellaswag_path()),
                                                                  PPO_ENV["eval_size"], PPO_ENV.get("split_seed", 0)).pool).rows)


def mean(policy: str, key: str, rows: list[int]) -> float:
    return rows_mean(records, policy, key, rows)


def ci(a: str, b: str, key: str, rows: list[int], scale: float = 1.0) -> str:
    return rows_paired_ci(records, a, b, key, rows).text(scale)


lines = ["HellaSwag 5-shot, pool rows, paired by row; acc_norm differences in points, gold log-lik in nats "
         "(against the fp16 pass of the same prompt).", ""]
for budget, fixed in BUDGETS.items():
    static = f"static-b{budget}"
    if not records[static]:
        continue
    # ppo-b3.0, ppo18k-b3.0, mlp-oracle-b3.0 (the MLP's teacher data is from the same episode set as PPO's)
    learned = sorted(p for p in records if p.startswith(("ppo", "mlp")) and p.endswith(f"-b{budget}"))
    rows = sorted(r for r in records[static] if all(r in records[p] for p in ["fp16", *learned, *fixed]))
    if learned:
        rows = [r for r in rows if r not in PPO_TRAINED_ON]
    lines += [f"### budget {budget} ({len(rows)} rows)", "",
              "| policy | avg bits (max) | acc_norm | Δ log-lik vs fp16 | static minus it: Δacc_norm | static minus it: "
              "Δ log-lik |", "|---|---|---|---|---|---|"]
    for p in ["fp16", static, *learned, *fixed]:
        most = max(records[p][r]["avg_bits"] for r in rows)
        diff = "— | —" if p == static else (f"{ci(static, p, 'correct_norm', rows, 100)} | "
                                            f"{ci(static, p, 'loglik_delta', rows)}")
        lines.append(f"| {p} | {mean(p, 'avg_bits', rows):.2f} ({most:.2f}) | {mean(p, 'correct_norm', rows):.3f} | "
                     f"{mean(p, 'loglik_delta', rows):+.2f} | {diff} |")
    for p in learned:
        lines += ["", f"| {p} minus | Δacc_norm | Δ log-lik |", "|---|---|---|"]
        lines += [f"| {q} | {ci(p, q, 'correct_norm', rows, 100)} | {ci(p, q, 'loglik_delta', rows)} |"
                  for q in ["fp16", static, *fixed]]
    lines.append("")
text = "\n".join(lines) + "\n"
(HERE / "table.md").write_text(text)
print(text)
