"""Compare evaluated policies: terminal table, ``report.md`` and the accuracy-vs-memory Pareto plot.

    python -m experiments.report runs/eval [runs/eval_ppo/summary.json ...] --out runs/report

Reads one or more ``summary.json`` files written by ``experiments.evaluate`` (a result directory
stands for the ``summary.json`` inside it), so policies evaluated in separate runs on the same
items can be put side by side without re-running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from experiments.io import write_text
from experiments.stats import DEFAULT_REFERENCES

COLUMNS = ("policy", "items", "acc", "acc_norm [95% CI]", "Δacc_norm vs fp16", "Δacc_norm vs fixed-4",
           "Δ gold log-lik (nats)", "avg bits", "KV ratio", "ms/token")


def load_summaries(paths: Sequence[str | Path]) -> dict[str, dict]:
    """Merge the ``policies`` of several summary.json files; a later file wins a name clash (warned)."""
    if not paths:
        raise ValueError("no summary given; pass a result directory or a summary.json file")
    merged: dict[str, dict] = {}
    for p in map(Path, paths):
        file = p / "summary.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no summary file at {file}; pass a directory written by "
                                    "experiments.evaluate or the path of its summary.json")
        try:
            policies = json.loads(file.read_text())["policies"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{file} is not a summary.json from experiments.evaluate ({exc!r})") from None
        for name, entry in policies.items():
            if name in merged:
                warnings.warn(f"policy {name!r} appears in several summaries; using the one from {file}",
                              stacklevel=2)
            merged[name] = entry
    return merged


def _paired(entry: dict, ref: str) -> dict | None:
    """Paired differences to ``ref``; also accepts the dash-less spelling ('fixed4') of a reference."""
    paired = entry.get("paired", {})
    return paired.get(ref) or paired.get(ref.replace("-", ""))


def _ci(c: dict | None, fmt: str = ".3f", signed: bool = False) -> str:
    if not c:
        return "—"
    s = "+" if signed else ""
    return f"{c['mean']:{s}{fmt}} [{c['lo']:{s}{fmt}}, {c['hi']:{s}{fmt}}]"


def _rows(policies: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, entry in policies.items():
        s = entry["summary"]
        deltas = [_ci((_paired(entry, ref) or {}).get("acc_norm"), signed=True) for ref in DEFAULT_REFERENCES]
        rows.append([name, str(s["items"]), f"{s['acc']['mean']:.3f}", _ci(s["acc_norm"]), *deltas,
                     _ci(s["loglik_delta"], ".2f", signed=True), f"{s['avg_bits']['mean']:.2f}", f"{s['kv_ratio']['mean']:.3f}",
                     f"{s['ms_per_token']['mean']:.2f}"])
    return rows


def markdown_table(policies: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(policies)]
    return "\n".join(lines) + "\n"


def print_table(policies: dict[str, dict], console: Console | None = None) -> None:
    """Same rows as the Markdown table; intervals go on a dim second line so it fits ~100 columns."""
    table = Table(title="KV-precision policies on HellaSwag (95% CIs; Δ = paired difference per item)")
    table.add_column("policy", no_wrap=True, min_width=max(map(len, policies), default=6))
    for col in ("items", "acc", "acc_norm", "Δacc_norm\nvs fp16", "Δacc_norm\nvs fixed-4", "Δ gold\nlog-lik", "avg\nbits", "KV\nratio",
                "ms/\ntoken"):
        table.add_column(col, justify="right")
    for row in _rows(policies):
        table.add_row(*(cell.replace(" [", "\n[dim]\\[", 1) + "[/dim]" if " [" in cell else cell for cell in row))
    if console is None:  # logs and pipes get a wide table rather than rich's 80-column default
        console = Console() if Console().is_terminal else Console(width=140)
    console.print(table)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (lower-or-equal x and higher-or-equal y, one strictly)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]


def plot_pareto(policies: dict[str, dict], path: str | Path) -> Path:
    """acc_norm against average bits and against KV bytes ratio; the non-dominated policies are joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(policies)
    acc = [policies[n]["summary"]["acc_norm"] for n in names]
    y = [a["mean"] for a in acc]
    yerr = [[a["mean"] - a["lo"] for a in acc], [a["hi"] - a["mean"] for a in acc]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, label in zip(axes, ("avg_bits", "kv_ratio"), ("average KV bits", "KV bytes / fp16 KV bytes"), strict=True):
        x = [policies[n]["summary"][key]["mean"] for n in names]
        ax.errorbar(x, y, yerr=yerr, fmt="o", color="tab:blue", ecolor="0.6", capsize=3, label="policy")
        front = sorted(pareto_front(list(zip(x, y, strict=True))), key=lambda i: x[i])
        ax.plot([x[i] for i in front], [y[i] for i in front], "-D", color="tab:red", mfc="none", ms=10,
                label="Pareto front")
        for xi, yi, n in zip(x, y, names, strict=True):
            ax.annotate(n, (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("HellaSwag acc_norm (95% CI)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Accuracy vs KV-cache memory")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keep the suffix: savefig picks the format by it
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", metavar="RESULT_DIR_OR_SUMMARY_JSON")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.md and pareto.png go (default: next to the first summary)")
    args = parser.parse_args(argv)
    try:
        policies = load_summaries(args.summaries)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if not policies:
        parser.error("the given summaries contain no policies")
    first = Path(args.summaries[0])
    out = args.out or (first if first.is_dir() else first.parent)
    print_table(policies)
    md = ("# KV-precision policies on HellaSwag\n\n"
          "Means with 95% confidence intervals (Wilson for accuracies, Student-t otherwise). "
          "Δ columns are paired per-item differences (this policy minus the reference); "
          "Δ gold log-lik is the gold ending's log-likelihood change against the full-precision pass "
          "of the same prompt (nats, mean [95% CI]): a far sharper signal than accuracy.\n\n"
          + markdown_table(policies) + "\n![Pareto view](pareto.png)\n")
    write_text(out / "report.md", md)
    plot_pareto(policies, out / "pareto.png")
    print(f"wrote {out / 'report.md'} and {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
