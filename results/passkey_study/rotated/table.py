"""Sections 11 and 12's tables from the evaluation summaries (nothing re-run): per budget, every row's accuracy,
bits and gold log-likelihood, and the rotated selector's paired 95% CIs against each baseline (section 12: the
selector that also marks the prompt's last 32 tokens).

Run from the repository root: python results/passkey_study/rotated/table.py
"""
import json
from pathlib import Path

EVAL = Path("results/passkey_study/evaluate")
SUMMARIES = [json.loads(p.read_text()) for p in sorted(EVAL.glob("summary_*.json"))]

BUDGETS = {
    "2.5": ("rot-select-b2.5", ["fp16", "rot-k3v2", "rotkv-k3v2", "rot-2+s4", "rot-static-fine-b2.5", "fixed:k3v2",
                                "static-fine-b2.5", "select-b2.5"]),
    "2.25": ("rot-select-b2.25", ["fp16", "rotkv-2+s4", "rot-2+s4", "rot-static-fine-b2.25", "fixed:2+s4", "static-fine-b2.25",
                                  "select-b2.25"]),
    "2.5, tail 32 (section 12)": ("rot-select-tail32-b2.5", ["fp16", "rotkv-k3v2", "rot-k3v2", "rot-static-fine-b2.5",
                                                            "rot-select-b2.5", "fixed:k3v2"]),
}


def summary(policy: str) -> dict | None:
    for s in SUMMARIES:
        if policy in s["policies"]:
            return s["policies"][policy]["summary"]
    return None


def paired(a: str, b: str) -> tuple[dict, dict, int] | None:
    """(Δacc, Δ log-lik, items) of a minus b, from whichever summary paired them (flipped if it paired b - a)."""
    for s in SUMMARIES:
        pol = s["policies"]
        if a in pol and b in pol[a].get("paired", {}):
            p = pol[a]["paired"][b]
            return p["acc"], p["loglik_delta"], p["items"]
        if b in pol and a in pol[b].get("paired", {}):
            p = pol[b]["paired"][a]
            flip = lambda d: {"mean": -d["mean"], "lo": -d["hi"], "hi": -d["lo"]}  # noqa: E731
            return flip(p["acc"]), flip(p["loglik_delta"]), p["items"]
    return None


def ci(d: dict, pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:+.2f}")
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


for budget, (ours, rows) in BUDGETS.items():
    print(f"\n### budget {budget}\n")
    print(f"| row | items | avg bits | acc | exact match | Δ log-lik vs fp16 | {ours} minus row: Δacc (pt), Δ log-lik |")
    print("|---|---|---|---|---|---|---|")
    for row in [ours, *rows]:
        s = summary(row)
        if s is None:
            print(f"| {row} | (not evaluated) | | | | | |")
            continue
        vs_fp16 = paired(row, "fp16") if row != "fp16" else None
        diff = paired(ours, row) if row != ours else None
        print(
            f"| {row} | {s['items']} | {s['avg_bits']['mean']:.2f} | {s['acc']['mean']:.3f} | "
            f"{s['exact_match']['mean']:.3f} | {ci(vs_fp16[1]) if vs_fp16 else '—'} | "
            + (f"{ci(diff[0], True)}, {ci(diff[1])} (n={diff[2]})" if diff else "—")
            + " |"
        )
