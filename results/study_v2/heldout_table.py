"""Study v2 on the held-out items: per budget, every policy that fits it against fp16, the fixed settings chosen on
pool items and the searched static schedule, paired by row (heldout.yaml's records; nothing fitted on these rows).

Controllers of a budget (``rule-``, ``mlp-``, ``ppo...-b<budget>``) enter its table once they have run every item.
The oracle (heldout_oracle.yaml: per-item greedy search completing with the budget's static schedule, evaluation
only) runs on the first 100 items; its own section pairs it with the budget's policies on the rows it has run: its
margin over the static schedule is the headroom a learned per-item policy has over the search baseline. The
gold-blind oracle (blind-oracle) searches for the best mean log-lik of all endings instead: its margin on the gold
ending does not come from knowing the answer. The prompt-only search (return-oracle on the reward prompt_loglik)
values each branch by the prompt's own later tokens: it sees no ending, so a deployment could run it at prefill.

Only rows where every policy of the budget (and fp16) has a record, all computed under one fingerprint, are used,
so a table of a run still in progress is a complete paired table of fewer items (it says how many).
Run from the repository root: python results/study_v2/heldout_table.py  (-> heldout.md, heldout.png)
"""
import functools
from pathlib import Path

import yaml

from experiments.report import plot_pareto
from experiments.stats import record_fingerprint, records_by_policy, rows_mean, rows_paired_ci, summarize_all

HERE = Path(__file__).parent
records = records_by_policy([HERE / "heldout" / "records.jsonl"])
ITEMS = yaml.safe_load((HERE / "heldout.yaml").read_text())["items"]  # the study's size, from its config

BUDGETS = {  # the fixed settings chosen on pool items (results/frontier/rotated), the best first
    3.0: ["rotkv-k4v2", "rotkv-k3v2+s4"],
    2.5: ["rotkv-k3v2", "rotkv-2+s4"],
}


def of_budget(budget: float, by: dict = records) -> list[str]:
    """The controllers of a budget (the calibrated rule, MLPs, PPO), named ``<kind>...-b<budget>``."""
    return sorted(p for p in by if p.startswith(("rule", "ppo", "mlp")) and p.endswith(f"-b{budget}"))


def controllers(budget: float, by: dict = records) -> list[str]:
    """The budget's controllers that ran every item; one still running is listed apart (``in_progress``), so the
    table stays a complete paired table of all the items while a new row is being added."""
    return [p for p in of_budget(budget, by) if len(by[p]) >= ITEMS]


def in_progress(budget: float, by: dict = records) -> list[str]:
    return [p for p in of_budget(budget, by) if len(by[p]) < ITEMS]


def complete_rows(policies: list[str], by: dict = records) -> list[int]:
    """Rows every one of ``policies`` ran, all under one fingerprint (paired differences never mix machines)."""
    rows = set.intersection(*(set(by[p]) for p in policies))
    return sorted(r for r in rows if len({record_fingerprint(by[p][r]) for p in policies}) == 1)


def ci(a: str, b: str, key: str, rows: list[int], scale: float = 1.0, by: dict = records) -> str:
    return rows_paired_ci(by, a, b, key, rows).text(scale)


def partial(rows: list[int]) -> str:
    """What a table's heading adds while its run has not reached every item."""
    return "" if len(rows) >= ITEMS else f"; **partial: {len(rows)} of {ITEMS} items so far**"


def policy_table(policies: list[str], best: str, rows: list[int], by: dict = records) -> list[str]:
    """Markdown rows: each policy's bits and acc_norm, and its paired differences against fp16 and ``best``."""
    table = [f"| policy | avg bits (max) | acc_norm | Δ log-lik vs fp16 | Δacc_norm vs fp16 | minus {best}: Δ log-lik | "
             f"minus {best}: Δacc_norm |", "|---|---|---|---|---|---|---|"]
    for p in policies:
        most = max(by[p][r]["avg_bits"] for r in rows)
        vs_fp16 = "— | —" if p == "fp16" else (f"{ci(p, 'fp16', 'loglik_delta', rows, by=by)} | "
                                               f"{ci(p, 'fp16', 'correct_norm', rows, 100, by=by)}")
        vs_best = "— | —" if p in ("fp16", best) else (f"{ci(p, best, 'loglik_delta', rows, by=by)} | "
                                                       f"{ci(p, best, 'correct_norm', rows, 100, by=by)}")
        table.append(f"| {p} | {rows_mean(by, p, 'avg_bits', rows):.2f} ({most:.2f}) | "
                     f"{rows_mean(by, p, 'correct_norm', rows):.3f} | {vs_fp16} | {vs_best} |")
    return table


def against_static(policies: list[str], static: str, rows: list[int], by: dict = records) -> list[str]:
    """Markdown rows: each policy's bits and acc_norm, and its paired differences against the static schedule."""
    return ["| policy | avg bits | acc_norm | minus the static schedule: Δ log-lik | Δacc_norm |", "|---|---|---|---|---|",
            *(f"| {p} | {rows_mean(by, p, 'avg_bits', rows):.2f} | {rows_mean(by, p, 'correct_norm', rows):.3f} | "
              f"{ci(p, static, 'loglik_delta', rows, by=by)} | {ci(p, static, 'correct_norm', rows, 100, by=by)} |"
              for p in policies)]


lines = ["HellaSwag 5-shot, held-out rows (the eval split), paired by row; Δacc_norm in points, gold log-lik in nats "
         "against the fp16 pass of the same prompt. Fixed settings chosen, schedules searched and policies trained on "
         "pool items only.", ""]
for budget, fixed in BUDGETS.items():
    static = f"static-b{budget}"
    policies = ["fp16", static, *controllers(budget), *fixed]
    if not all(records[p] for p in policies):
        continue
    rows = complete_rows(policies)
    if not rows:
        continue
    best = fixed[0]
    lines += [f"### budget {budget} ({len(rows)} rows{partial(rows)})", "", *policy_table(policies, best, rows)]
    for p in controllers(budget):
        lines += ["", f"| {p} minus | Δ log-lik | Δacc_norm |", "|---|---|---|"]
        lines += [f"| {q} | {ci(p, q, 'loglik_delta', rows)} | {ci(p, q, 'correct_norm', rows, 100)} |"
                  for q in [static, *fixed]]
    lines += [f"\n{p}: {len(records[p])} of {ITEMS} items so far, not in the table yet" for p in in_progress(budget)]
    lines.append("")
    oracle = f"oracle-b{budget}"
    if not records.get(oracle):
        continue
    rows = complete_rows([oracle, *policies])
    if not rows:
        continue
    lines += [f"#### the oracle at {budget} bits ({len(rows)} rows: the first of the held-out items)", "",
              "| policy | avg bits | acc_norm | Δ log-lik vs fp16 | minus the static schedule: Δ log-lik | Δacc_norm |",
              "|---|---|---|---|---|---|"]
    for p in [oracle, static, *controllers(budget), best]:
        vs_static = "— | —" if p == static else f"{ci(p, static, 'loglik_delta', rows)} | {ci(p, static, 'correct_norm', rows, 100)}"
        lines.append(f"| {p} | {rows_mean(records, p, 'avg_bits', rows):.2f} | {rows_mean(records, p, 'correct_norm', rows):.3f} | "
                     f"{ci(p, 'fp16', 'loglik_delta', rows)} | {vs_static} |")
    headroom = rows_mean(records, oracle, "loglik_delta", rows) - rows_mean(records, static, "loglik_delta", rows)
    for p in controllers(budget):
        gained = rows_mean(records, p, "loglik_delta", rows) - rows_mean(records, static, "loglik_delta", rows)
        lines.append(f"\n{p} gains {gained:+.2f} nats over the schedule on these rows, of the oracle's {headroom:+.2f}.")
    lines.append("")
    blind = f"blind-oracle-b{budget}"  # the same search valued by every ending's log-lik, blind to the gold one
    rows = complete_rows([blind, oracle, *policies]) if records.get(blind) else []
    if rows:
        lines += [f"#### the gold-blind oracle at {budget} bits ({len(rows)} rows)", "",
                  *against_static([blind, oracle, *controllers(budget)], static, rows), ""]

# PPO at 2.5 ran on another machine (heldout_ppo_b2.5.yaml): its comparators were recomputed beside it, so it
# pairs only with its own run's rows; the rows both runs hold show how far the machine moves the same policy.
beside = records_by_policy([HERE / "heldout_ppo_b2.5" / "records.jsonl"])
static25, fixed25 = "static-b2.5", BUDGETS[2.5][0]
ppos25 = controllers(2.5, beside)
rows = complete_rows(["fp16", static25, *ppos25, fixed25], beside) if ppos25 else []
if rows:
    lines += [f"### budget 2.5: PPO warm-started from the schedule (ppowarm: gold reward; ppoblind: every ending's "
              f"mean, gold-blind), with its comparators recomputed beside it "
              f"({len(rows)} rows{partial(rows)})", "",
              *policy_table(["fp16", static25, *ppos25, fixed25], fixed25, rows, beside)]
    for p in ppos25:
        lines += ["", f"| {p} minus | Δ log-lik | Δacc_norm |", "|---|---|---|"]
        lines += [f"| {q} | {ci(p, q, 'loglik_delta', rows, by=beside)} | {ci(p, q, 'correct_norm', rows, 100, by=beside)} |"
                  for q in [static25, *(o for o in ppos25 if o != p)]]
    lines += [f"\n{p}: {len(beside[p])} of {ITEMS} items so far, not in the table yet" for p in in_progress(2.5, beside)]
    lines.append("")
    # heldout_oracle_b2.5.yaml: the oracles on the first 100 items, beside these rows
    first = yaml.safe_load((HERE / "heldout_oracle_b2.5.yaml").read_text())["items"]
    static_mean = functools.partial(rows_mean, beside, static25, "loglik_delta")
    # (policy, others on its rows, what it is, whether it is an oracle: its margin is the controllers' headroom)
    for oracle, others, what, is_oracle in (("blind-oracle-b2.5", [], "the gold-blind oracle", True),
                                            ("oracle-b2.5", ["blind-oracle-b2.5"], "the oracle", True),
                                            # the same search valued by the prompt's own tokens: deployable
                                            ("prompt-search-b2.5", ["blind-oracle-b2.5"], "the prompt-only search",
                                             False),
                                            ("prompt-tail-search-b2.5", ["blind-oracle-b2.5"],
                                             "the search on the prompt's last 52 tokens", False)):
        ran = beside.get(oracle) and all(beside.get(o) for o in others)
        oracle_rows = complete_rows([oracle, *others, "fp16", static25, *ppos25, fixed25], beside) if ran else []
        if not oracle_rows:
            continue
        lines += [f"#### {what} at 2.5 bits ({len(oracle_rows)} rows: the first of the held-out items"
                  f"{'' if len(oracle_rows) >= first else f'; **partial: {len(oracle_rows)} of {first} so far**'})", "",
                  *against_static([oracle, *others, *ppos25, fixed25], static25, oracle_rows, beside), ""]
        headroom = rows_mean(beside, oracle, "loglik_delta", oracle_rows) - static_mean(oracle_rows)
        lines += [] if not is_oracle else [f"{p} gains {rows_mean(beside, p, 'loglik_delta', oracle_rows) - static_mean(oracle_rows):+.2f} "
                  f"nats over the schedule on these rows, of {what}'s {headroom:+.2f}." for p in ppos25]
        lines.append("")
    searches = ["oracle-b2.5", "prompt-tail-search-b2.5", "prompt-search-b2.5"]
    shared_plans = complete_rows(["blind-oracle-b2.5", *searches], beside)
    if shared_plans:  # which blocks' settings each per-item search shares with the gold-blind oracle's plan
        from agents.static import StaticSchedulePolicy

        schedule = StaticSchedulePolicy.load(str(HERE / "search" / "schedule_b2.5.json"), ["progress"],
                                             [2, (3, 2), (4, 2), 4, 8, 16])
        lines += [f"#### agreement with the gold-blind oracle's plans ({len(shared_plans)} rows)", "",
                  "| policy | blocks whose setting equals the blind oracle's |", "|---|---|"]
        for p in [static25, *searches]:
            same = total = 0
            for r in shared_plans:
                blind = beside["blind-oracle-b2.5"][r]["actions"]
                plan = schedule.actions_for(len(blind)) if p == static25 else beside[p][r]["actions"]
                same += sum(int(a == b) for a, b in zip(plan, blind, strict=True))
                total += len(blind)
            lines.append(f"| {p} | {same / total:.2f} |")
        lines.append("")
    both = [r for r in rows if all(r in records[p] for p in (static25, fixed25))]
    if both:
        moved = {p: [abs(beside[p][r]["loglik_delta"] - records[p][r]["loglik_delta"]) for r in both]
                 for p in (static25, fixed25)}
        lines += [f"The same {len(both)} rows in heldout.yaml's run (another machine): {static25} minus {fixed25} "
                  f"{ci(static25, fixed25, 'loglik_delta', both, by=beside)} here, "
                  f"{ci(static25, fixed25, 'loglik_delta', both)} there; one item's gold log-lik moves between the "
                  "machines by " + ", ".join(f"{sum(v) / len(v):.2f} nats ({p})" for p, v in moved.items()) +
                  " on average, in absolute value.", ""]

everything = [p for p in records if len(records[p]) >= ITEMS]  # the oracles ran on 100 items
shared = complete_rows(everything)
if shared:  # the quantized policies only: fp16 (0 nats, 16 bits) would squeeze them into one corner
    quantized = summarize_all([records[p][r] for p in everything for r in shared], references=["fp16"])
    fp16_acc = rows_mean(records, "fp16", "correct_norm", shared)
    plot_pareto({p: v for p, v in quantized.items() if p != "fp16"}, HERE / "heldout.png",
                title=f"Study v2, held-out HellaSwag 5-shot ({len(shared)} items every policy ran; "
                      f"fp16: 0 nats, acc_norm {fp16_acc:.3f})")
    lines += [f"![held-out frontier](heldout.png) ({len(shared)} items every policy ran)", ""]
text = "\n".join(lines) + "\n"
(HERE / "heldout.md").write_text(text)
print(text)
