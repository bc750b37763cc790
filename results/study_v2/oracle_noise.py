"""How much of the oracle's headroom over the static schedule is real, and how much is fitted to float noise?

The per-item oracle (heldout_oracle.yaml) searches each item with its own passes, so it also exploits the chaos of
min-max quantization: a last-bit change in an activation can move a code across a rounding edge, and the same episode
on another machine differs per item (issue 13: 1.6 nats at fixed-2, 0.17 at fixed-4). A learned policy cannot predict
that part, so it is not headroom a learned policy has. This replays each oracle's stored plan (the gold oracle's and
the gold-blind one's, each on its own held-out rows), the static schedule and PPO on a *perturbed* model: every
weight multiplied by (1 + 2^-23 * N(0, 1)), about one float32 ulp, which emulates another machine's last bits
without changing the model. If an oracle's margin over the schedule survives the perturbation, it is real; what it
loses is what it had fitted to the noise.

Run from the repository root (after heldout_oracle.yaml; resumes: plans already in oracle_noise.jsonl are skipped):
    python results/study_v2/oracle_noise.py      # -> oracle_noise.jsonl, oracle_noise.md
"""
import json
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from agents.registry import make_policy
from agents.rollout import Schedule, rollout
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments.stats import paired_diff_ci, records_by_policy

HERE = Path(__file__).parent
ORACLE, BLIND, STATIC, PPO = "oracle-b3.0", "blind-oracle-b3.0", "static-b3.0", "ppo18k-b3.0"
PLANNED = (ORACLE, BLIND)  # policies whose plan is replayed; each is compared on its own rows
OUT = HERE / "oracle_noise.jsonl"
SEED = 0

study = yaml.safe_load((HERE / "heldout.yaml").read_text())
records = records_by_policy([HERE / "heldout" / "records.jsonl"])


def planned_rows(name: str) -> list[int]:
    """The held-out rows where `name` has a stored plan and the static schedule and PPO have records."""
    return [r for r, rec in sorted(records.get(name, {}).items())
            if "actions" in rec and r in records[STATIC] and r in records[PPO]]


def load_perturbed() -> dict[int, dict]:
    """Rows already replayed, merged by row (a later line adds the plans replayed in a later sitting)."""
    merged: dict[int, dict] = {}
    for line in OUT.read_text().splitlines() if OUT.exists() else []:
        record = json.loads(line)
        merged.setdefault(record["row"], {}).update(record)
    return merged


planned = {name: planned_rows(name) for name in PLANNED}
perturbed = load_perturbed()
missing_plans = {r: [p for p in PLANNED if r in planned[p] and p not in perturbed.get(r, {})]
                 for r in sorted(set().union(*planned.values()))}
todo = {r: missing for r, missing in missing_plans.items() if missing}


def replay_on_perturbed_model(todo: dict[int, list[str]], perturbed: dict[int, dict]) -> None:
    """Replay each row's missing plans (and, on a new row, the schedule and PPO) on the perturbed model,
    appending one line per row to OUT."""
    torch.set_num_threads(1)
    env = KVPrecisionEnv(EnvConfig.from_dict({**study["env"], **study["policy_env"][PPO]}))  # PPO's features, 3.0 bits
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for p in env.model.parameters():
            p.mul_(1 + 2.0 ** -23 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    specs = dict(spec.split("=", 1) for spec in study["policies"] if "=" in spec)  # alias -> spec
    policies = {name: make_policy(specs[name], env=env) for name in (STATIC, PPO)}
    for row, missing in tqdm(todo.items(), desc="perturbed replays"):
        scores = {name: rollout(env, Schedule(records[name][row]["actions"]), options={"row": row}).final_info
                  for name in missing}
        if row not in perturbed:
            scores |= {name: rollout(env, policy, options={"row": row}).final_info for name, policy in policies.items()}
        with open(OUT, "a") as f:
            f.write(json.dumps({"row": row, **{k: v["loglik_delta"] for k, v in scores.items()}}) + "\n")
    env.close()


if todo:  # nothing to replay: the table only, without loading the model
    replay_on_perturbed_model(todo, perturbed)

perturbed = load_perturbed()
lines = ["Oracle headroom under a 1-ulp weight perturbation (held-out rows, 3.0 bits; gold log-lik, nats)", "",
         "| | rows | as recorded | perturbed model (plans kept) |", "|---|---|---|---|"]
for planner in PLANNED:
    rows = [r for r in planned[planner] if planner in perturbed.get(r, {})]
    if not rows:
        continue
    original = {p: [records[p][r]["loglik_delta"] for r in rows] for p in (planner, STATIC, PPO)}
    noisy = {p: [perturbed[r][p] for r in rows] for p in (planner, STATIC, PPO)}
    for p in (planner, PPO):
        lines.append(f"| {p} minus {STATIC} | {len(rows)} | {paired_diff_ci(original[p], original[STATIC]).text()} | "
                     f"{paired_diff_ci(noisy[p], noisy[STATIC]).text()} |")
    for p in (planner, STATIC, PPO):
        size = sum(abs(a - b) for a, b in zip(noisy[p], original[p], strict=True)) / len(rows)
        lines.append(f"| {p}: perturbed minus recorded (mean absolute per item: {size:.2f}) | {len(rows)} | — | "
                     f"{paired_diff_ci(noisy[p], original[p]).text()} |")
text = "\n".join(lines) + "\n"
(HERE / "oracle_noise.md").write_text(text)
print(text)
