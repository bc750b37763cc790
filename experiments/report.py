"""Compare evaluated policies: terminal table, ``report.md`` and the damage/accuracy-vs-memory plot.

    python -m experiments.report runs/eval [runs/eval_ppo/summary.json ...] --out runs/report

Reads one or more ``summary.json`` files written by ``experiments.evaluate`` (a result directory
stands for the ``summary.json`` inside it), so policies evaluated in separate runs on the same
items can be put side by side without re-running anything. The Δ columns are the paired
differences against each reference the summaries were computed with (``references`` in
summary.json), the same columns wandb gets (experiments.tracking).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from experiments.io import write_text


@dataclass(frozen=True)
class Column:
    """One column of the comparison, shown alike in report.md, on the terminal and in wandb.

    ``value`` picks a ``{"mean", "lo", "hi"}`` interval (or a plain number) out of a policy's
    summary entry; ``key`` names it in wandb (``key``, ``key_lo``, ``key_hi``).
    """

    key: str
    title: str
    value: Callable[[dict], dict | float | None]
    fmt: str = ".3f"
    interval: bool = False  # print [lo, hi] after the mean
    signed: bool = False
    plain: bool = False  # a plain number (a count), not an interval

    def keys(self) -> list[str]:
        """Names of :meth:`numbers`: the key alone for a plain number, else mean, lo and hi."""
        return [self.key] if self.plain else [self.key, f"{self.key}_lo", f"{self.key}_hi"]

    def numbers(self, entry: dict) -> list:
        """The column's values as numbers (None where a policy has none, e.g. no Δ to itself)."""
        v = self.value(entry)
        if self.plain:
            return [v]
        return [v["mean"], v["lo"], v["hi"]] if v else [None, None, None]

    def text(self, entry: dict) -> str:
        v = self.value(entry)
        if v is None:
            return "—"
        if not isinstance(v, dict):
            return str(v)
        s = "+" if self.signed else ""
        mean = f"{v['mean']:{s}{self.fmt}}"
        return f"{mean} [{v['lo']:{s}{self.fmt}}, {v['hi']:{s}{self.fmt}}]" if self.interval else mean


def _summary(key: str) -> Callable[[dict], dict]:
    return lambda entry: entry["summary"][key]


def _delta(ref: str) -> Callable[[dict], dict | None]:
    return lambda entry: entry.get("paired", {}).get(ref, {}).get("acc_norm")


def budget_column(policies: dict[str, dict]) -> list[Column]:
    """``enforced/ep`` (steps per episode whose setting the env replaced to keep its bit budget), when
    some policy had any: without a budget the table stays as it was."""
    if not any(e["summary"].get("budget_enforced", {}).get("mean", 0) for e in policies.values()):
        return []
    return [Column("budget_enforced", "enforced/ep", lambda e: e["summary"].get("budget_enforced"), ".2f")]


def exact_match_column(policies: dict[str, dict]) -> list[Column]:
    """Greedy exact match, for tasks that record it (passkey); absent otherwise."""
    if not any("exact_match" in e["summary"] for e in policies.values()):
        return []
    return [Column("exact_match", "exact match", lambda e: e["summary"].get("exact_match"))]


#: How report titles name a task (``env.task`` of the evaluation config); other tasks show their name.
TASK_TITLES = {"hellaswag": "HellaSwag", "passkey": "pass-key retrieval"}


def task_title(paths: Sequence[str | Path]) -> str:
    """The task the summaries were evaluated on, for titles ("HellaSwag" when the config names none);
    several tasks are joined with " + " (a table mixing tasks is allowed, but says so)."""
    names: list[str] = []
    for p in map(Path, paths):
        file = p / "summary.json" if p.is_dir() else p
        try:
            env = json.loads(file.read_text()).get("config", {}).get("env", {}) or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            env = {}
        names.append(str(env.get("task") or "hellaswag"))
    return " + ".join(TASK_TITLES.get(n, n) for n in dict.fromkeys(names)) or "HellaSwag"


def columns(references: Sequence[str]) -> list[Column]:
    """The comparison's columns: one Δacc_norm per reference, in the order the references are given."""
    return [
        Column("items", "items", _summary("items"), plain=True),
        Column("acc", "acc", _summary("acc")),
        Column("acc_norm", "acc_norm [95% CI]", _summary("acc_norm"), interval=True),
        *(Column(f"d_acc_norm_vs_{ref}", f"Δacc_norm vs {ref}", _delta(ref), interval=True, signed=True)
          for ref in references),
        Column("loglik_delta", "Δ gold log-lik (nats)", _summary("loglik_delta"), ".2f", interval=True, signed=True),
        Column("avg_bits", "avg bits", _summary("avg_bits"), ".2f"),
        Column("kv_ratio", "KV ratio", _summary("kv_ratio")),
        Column("ms_per_token", "ms/token", _summary("ms_per_token"), ".2f"),
    ]


def load_summaries(paths: Sequence[str | Path]) -> tuple[dict[str, dict], list[str]]:
    """Merge the ``policies`` of several summary.json files (a later file wins a name clash, warned),
    and the references they were compared against, in the order first given."""
    if not paths:
        raise ValueError("no summary given; pass a result directory or a summary.json file")
    merged: dict[str, dict] = {}
    references: list[str] = []
    for p in map(Path, paths):
        file = p / "summary.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no summary file at {file}; pass a directory written by "
                                    "experiments.evaluate or the path of its summary.json")
        try:
            data = json.loads(file.read_text())
            policies = data["policies"]
            # summaries written before references were stored name them only in their config
            refs = data.get("references") or data.get("config", {}).get("references") or []
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{file} is not a summary.json from experiments.evaluate ({exc!r})") from None
        for name, entry in policies.items():
            if name in merged:
                warnings.warn(f"policy {name!r} appears in several summaries; using the one from {file}",
                              stacklevel=2)
            merged[name] = entry
        references += [*refs, *(k for e in policies.values() for k in e.get("paired", {}))]
    # a reference no policy was paired with (e.g. a config naming a policy left out) has no column
    present = [r for r in dict.fromkeys(references) if any(r in e.get("paired", {}) for e in merged.values())]
    return merged, present


def _rows(policies: dict[str, dict], cols: Sequence[Column]) -> list[list[str]]:
    return [[name, *(c.text(entry) for c in cols)] for name, entry in policies.items()]


def markdown_table(policies: dict[str, dict], references: Sequence[str]) -> str:
    cols = [*columns(references), *exact_match_column(policies), *budget_column(policies)]
    titles = ["policy", *(c.title for c in cols)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(policies, cols)]
    return "\n".join(lines) + "\n"


def _wrap(title: str) -> str:
    """Break a header at the space nearest its middle, so the terminal table stays narrow."""
    spaces = [i for i, ch in enumerate(title) if ch == " "]
    if not spaces:
        return title
    i = min(spaces, key=lambda i: abs(i - len(title) / 2))
    return title[:i] + "\n" + title[i + 1 :]


def print_table(policies: dict[str, dict], references: Sequence[str], console: Console | None = None,
                extra: Sequence[Column] = (), task: str = "HellaSwag") -> None:
    """Same rows as the Markdown table, plus the ``extra`` columns; intervals go on a dim second line
    so it fits ~100 columns."""
    cols = [*columns(references), *exact_match_column(policies), *budget_column(policies), *extra]
    table = Table(title=f"KV-precision policies on {task} (95% CIs; Δ = paired difference per item)")
    table.add_column("policy", no_wrap=True, min_width=max(map(len, policies), default=6))
    for c in cols:
        table.add_column(_wrap(c.title.removesuffix(" [95% CI]")), justify="right")
    for row in _rows(policies, cols):
        table.add_row(*(cell.replace(" [", "\n[dim]\\[", 1) + "[/dim]" if " [" in cell else cell for cell in row))
    if console is None:  # logs and pipes get a wide table rather than rich's 80-column default
        console = Console() if Console().is_terminal else Console(width=140)
    console.print(table)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (lower-or-equal x and higher-or-equal y, one strictly)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]


_PANELS_X = (("avg_bits", "average KV bits"), ("kv_ratio", "KV bytes / fp16 KV bytes"))
_PANELS_Y = (("loglik_delta", "Δ gold log-lik vs full precision\n(nats, 95% CI; symlog)"),
             ("acc_norm", "acc_norm (95% CI)"))
_MARKERS = "osD^v<>pPX*h"


def _spread_labels(xy: Sequence[tuple[float, float]], min_dy: float = 13.0, near_dx: float = 110.0,
                   lift: float = 10.0) -> list[tuple[float, float]]:
    """Label positions (display pixels) for points at ``xy`` (pixels): just above each point, pushed up
    until no two labels that would overlap horizontally are closer than ``min_dy``; coinciding
    points get stacked labels, each tied to its point by a leader line."""
    placed: dict[int, tuple[float, float]] = {}
    for i in sorted(range(len(xy)), key=lambda i: (xy[i][1], xy[i][0])):
        x, y = xy[i][0], xy[i][1] + lift
        # one pass upwards over the labels already placed (ascending): y only grows, so it ends
        for px, py in sorted(placed.values(), key=lambda p: p[1]):
            if abs(px - x) < near_dx and abs(py - y) < min_dy:
                y = max(y, py + min_dy)
        placed[i] = (x, y)
    return [placed[i] for i in range(len(xy))]


def plot_pareto(policies: dict[str, dict], path: str | Path,
                title: str = "KV-cache precision: damage (Δ gold log-lik) and accuracy vs memory",
                label: Callable[[str], str] = str, log_x: bool = False) -> Path:
    """Δ gold log-lik (the sharp signal) and acc_norm against average bits and KV ratio, 2x2.

    Every policy has its own colour and marker (hollow, so coinciding points stay visible) and a
    text label (``label(name)``) tied to its point by a leader line; the non-dominated policies are
    joined. ``log_x`` spreads many low-bit settings apart (memory axes on a log-2 scale).
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(policies)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(names))]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex="col", sharey="row")
    for row, (ykey, ylabel) in enumerate(_PANELS_Y):
        ci = [policies[n]["summary"][ykey] for n in names]
        y = [c["mean"] for c in ci]
        for col, (xkey, xlabel) in enumerate(_PANELS_X):
            ax = axes[row][col]
            x = [policies[n]["summary"][xkey]["mean"] for n in names]
            for i, n in enumerate(names):
                ax.errorbar([x[i]], [y[i]], yerr=[[y[i] - ci[i]["lo"]], [ci[i]["hi"] - y[i]]],
                            fmt=_MARKERS[i % len(_MARKERS)], color=colors[i], mfc="none", ms=8, mew=1.5,
                            ecolor=colors[i], elinewidth=1, capsize=3, alpha=0.9, label=n)
            front = sorted(pareto_front(list(zip(x, y, strict=True))), key=lambda i: x[i])
            ax.plot([x[i] for i in front], [y[i] for i in front], "-", color="tab:red", alpha=0.4, lw=2,
                    zorder=0, label="Pareto front")
            if ykey == "loglik_delta":
                ax.set_yscale("symlog", linthresh=0.1)
            if log_x:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.margins(x=0.06, y=0.12)  # room for the labels above the highest points
            ax.grid(alpha=0.3)
            if row == len(_PANELS_Y) - 1:
                ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9, title="policy")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    to_points = 72.0 / fig.dpi
    for row, (ykey, _) in enumerate(_PANELS_Y):
        for col, (xkey, _) in enumerate(_PANELS_X):
            ax = axes[row][col]
            data = [(policies[n]["summary"][xkey]["mean"], policies[n]["summary"][ykey]["mean"]) for n in names]
            pixels = [tuple(ax.transData.transform(p)) for p in data]
            for n, p, (px, py), (lx, ly) in zip(names, data, pixels, _spread_labels(pixels), strict=True):
                ax.annotate(label(n), p, xytext=((lx - px) * to_points + 6, (ly - py) * to_points),
                            textcoords="offset points", fontsize=8, va="bottom", zorder=5,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": 4})
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
        policies, references = load_summaries(args.summaries)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if not policies:
        parser.error("the given summaries contain no policies")
    first = Path(args.summaries[0])
    out = args.out or (first if first.is_dir() else first.parent)
    task = task_title(args.summaries)
    print_table(policies, references, task=task)
    md = (f"# KV-precision policies on {task}\n\n"
          "Means with 95% confidence intervals (Wilson for accuracies, Student-t otherwise). "
          "Δ columns are paired per-item differences (this policy minus the reference); "
          "Δ gold log-lik is the gold ending's log-likelihood change against the full-precision pass "
          "of the same prompt (nats, mean [95% CI]): a far sharper signal than accuracy.\n\n"
          + markdown_table(policies, references) + "\n![Pareto view](pareto.png)\n")
    write_text(out / "report.md", md)
    plot_pareto(policies, out / "pareto.png",
                title=f"KV-cache precision on {task}: damage (Δ gold log-lik) and accuracy vs memory")
    print(f"wrote {out / 'report.md'} and {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
