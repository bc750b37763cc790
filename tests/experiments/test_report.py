"""experiments.report: table, report.md and pareto.png from synthetic summary.json files."""

from __future__ import annotations

import json
import random

import pytest

from experiments.report import load_summaries, main, markdown_table, pareto_front, print_table
from experiments.stats import summarize_all
from experiments.tracking import log_summary_table

REFS = ["fp16", "fixed:4"]


def _summary_file(path, policies_bits, seed=0, n=30, references=REFS):
    rng = random.Random(seed)
    records = []
    for name, bits in policies_bits.items():
        for row in range(n):
            p = 0.3 + 0.02 * bits
            records.append({"policy": name, "row": row, "correct": int(rng.random() < p),
                            "correct_norm": int(rng.random() < p), "pred": 0, "pred_norm": 0, "gold": 0,
                            "loglik_delta": -1.0 / bits, "avg_bits": bits, "kv_bytes": 10 * bits,
                            "fp16_kv_bytes": 160, "ms": 50 + rng.random(), "tokens": 400})
    path.mkdir(parents=True, exist_ok=True)
    policies = summarize_all(records, references)
    (path / "summary.json").write_text(json.dumps({"config": {"seed": seed}, "references": references,
                                                   "policies": policies}))
    return path


def test_report_writes_markdown_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a wide rich console, so policy names are not wrapped
    run = _summary_file(tmp_path / "eval", {"fp16": 16, "fixed:4": 4, "fixed:2": 2, "rule": 6.5})
    out = tmp_path / "report"
    assert main([str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    terminal = capsys.readouterr().out
    for name in ("fp16", "fixed:4", "fixed:2", "rule"):
        assert f"| {name} |" in md
        assert f" {name} " in terminal
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_merge_later_file_wins_with_warning(tmp_path):
    a = _summary_file(tmp_path / "a", {"fp16": 16, "fixed:4": 4}, seed=1)
    b = _summary_file(tmp_path / "b", {"fp16": 16, "ppo": 5}, seed=2, references=["fp16", "ppo"])
    with pytest.warns(UserWarning, match="'fp16'"):
        merged, references = load_summaries([a, b / "summary.json"])
    assert list(merged) == ["fp16", "fixed:4", "ppo"]
    assert references == ["fp16", "ppo"]  # b's fp16 replaced a's, the only one paired with fixed:4
    assert merged["fp16"] == json.loads((b / "summary.json").read_text())["policies"]["fp16"]


def test_markdown_table_rows_and_deltas(tmp_path):
    policies, references = load_summaries([_summary_file(tmp_path, {"fp16": 16, "fixed:4": 4, "mlp": 7})])
    lines = markdown_table(policies, references).strip().splitlines()
    assert len(lines) == 2 + 3
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    fp16_row = next(line for line in lines if line.startswith("| fp16 |")).split("|")
    mlp_row = next(line for line in lines if line.startswith("| mlp |")).split("|")
    assert fp16_row[5].strip() == "—"  # no Δ of fp16 against itself
    assert mlp_row[5].strip().startswith(("+", "-")) and "[" in mlp_row[5]


def test_pareto_front():
    # (bits, acc): (2, .5) and (4, .7) and (16, .8) are non-dominated; (8, .6) is beaten by (4, .7)
    assert pareto_front([(2, 0.5), (4, 0.7), (8, 0.6), (16, 0.8)]) == [0, 1, 3]
    assert pareto_front([(4, 0.7), (4, 0.7)]) == [0, 1]


def test_missing_file_is_clear(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no summary file"):
        load_summaries([tmp_path / "nothing"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing")])
    assert "no summary file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a summary.json"):
        load_summaries([bad])


def test_every_reference_reaches_report_terminal_and_wandb(tmp_path, capsys, monkeypatch):
    """A third reference (rule) gets its Δ column in report.md, on the terminal and in the wandb table."""
    monkeypatch.setenv("COLUMNS", "250")
    refs = ["fp16", "fixed:4", "rule"]
    run_dir = _summary_file(tmp_path / "eval", {"fp16": 16, "fixed:4": 4, "rule": 6.5, "mlp": 7}, references=refs)
    policies, references = load_summaries([run_dir])
    assert references == refs
    header = markdown_table(policies, references).splitlines()[0]
    print_table(policies, references)
    terminal = capsys.readouterr().out
    logged = {}

    class FakeRun:
        summary: dict = {}

        def log(self, data):
            logged.update(data)

    log_summary_table(FakeRun(), policies, references)
    wandb_columns = logged["summary_table"].columns
    for ref in refs:
        assert f"Δacc_norm vs {ref}" in header
        assert f"vs {ref}" in terminal
        assert f"d_acc_norm_vs_{ref}" in wandb_columns
    mlp = dict(zip(wandb_columns, next(r for r in logged["summary_table"].data if r[0] == "mlp"), strict=True))
    assert mlp["d_acc_norm_vs_rule"] == policies["mlp"]["paired"]["rule"]["acc_norm"]["mean"]


def test_old_summary_without_references_is_readable(tmp_path):
    """Summaries from before ``references`` was stored: the config's list, limited to what was paired."""
    run_dir = _summary_file(tmp_path / "old", {"fp16": 16, "fixed-4": 4, "rule": 6}, references=["fp16", "fixed-4"])
    data = json.loads((run_dir / "summary.json").read_text())
    del data["references"]
    data["config"]["references"] = ["fp16", "fixed-4", "rule"]  # asked for, but never paired
    (run_dir / "summary.json").write_text(json.dumps(data))
    policies, references = load_summaries([run_dir])
    assert references == ["fp16", "fixed-4"]
    assert main([str(run_dir), "--out", str(tmp_path / "report")]) == 0
    assert "Δacc_norm vs fixed-4" in (tmp_path / "report" / "report.md").read_text()


def test_report_names_the_task_and_shows_exact_match(tmp_path):
    """A passkey evaluation's report says so in its title and gets the exact-match column."""
    import json as _json

    from experiments.report import task_title

    summary = _summary_file(tmp_path / "eval", {"fp16": 16, "fixed:2": 2}) / "summary.json"
    data = _json.loads(summary.read_text())
    assert task_title([summary]) == "HellaSwag"
    data.setdefault("config", {})["env"] = {"task": "passkey"}
    for i, entry in enumerate(data["policies"].values()):
        entry["summary"]["exact_match"] = {"mean": 0.5 + 0.25 * i, "lo": 0.1, "hi": 0.9}
    summary.write_text(_json.dumps(data))
    assert task_title([summary]) == "pass-key retrieval"
    policies, references = load_summaries([summary])
    header = markdown_table(policies, references).splitlines()[0]
    assert "exact match" in header
    out = tmp_path / "report"
    assert main([str(summary), "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# KV-precision policies on pass-key retrieval")
