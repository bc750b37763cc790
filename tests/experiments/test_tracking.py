"""experiments.tracking: wandb runs that need neither network nor an account."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest

from experiments import tracking

_ENTRY = {
    "summary": {**{k: {"mean": 0.5, "lo": 0.4, "hi": 0.6} for k in tracking._SCALARS}, "items": 12},
    "paired": {"fp16": {"acc": {"mean": -0.1, "lo": -0.2, "hi": 0.0},
                        "acc_norm": {"mean": -0.05, "lo": -0.15, "hi": 0.05}}},
}


@dataclass
class _Cfg:
    seed: int = 3
    bits: tuple[int, ...] = (2, 4)
    env: dict = field(default_factory=lambda: {"shots": 5})


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No account, no API key, no user settings: only what an offline machine has."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_offline_run_by_default(no_network, tmp_path):
    run = tracking.init_run(group="g", name="rule", config=_Cfg(), job_type="eval", dir=tmp_path / "runs")
    assert os.environ["WANDB_MODE"] == "offline"
    assert run.offline and dict(run.config) == {"seed": 3, "bits": [2, 4], "env": {"shots": 5}}
    assert run.group == "g" and run.job_type == "eval"
    tracking.log_summary_table(run, {"rule": _ENTRY}, ["fp16", "fixed:4"])
    assert run.summary["rule/acc_norm"] == 0.5 and run.summary["acc_norm"] == 0.5
    assert run.summary["d_acc_norm_vs_fp16"] == -0.05
    hint = tracking.finish(run)
    run_dir = next((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert hint == f"wandb sync {run_dir}"
    assert list(run_dir.glob("run-*.wandb"))
    table_files = list(run_dir.rglob("summary_table*.table.json"))
    assert table_files
    table = json.loads(table_files[0].read_text())
    assert table["columns"][:3] == ["policy", "items", "acc"] and table["data"][0][0] == "rule"
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert row["d_acc_norm_vs_fp16"] == -0.05 and row["d_acc_norm_vs_fp16_lo"] == -0.15
    assert row["d_acc_norm_vs_fixed:4"] is None  # a reference this policy was not paired with: empty cells


def test_disabled_mode_is_respected(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tracking.init_run(name="x", config={"a": 1}, job_type="eval", dir=tmp_path / "runs")
    tracking.log_summary_table(run, {"p": _ENTRY, "q": _ENTRY}, ["fp16"])  # a no-op run still takes the calls
    assert tracking.finish(run) is None
    assert os.environ["WANDB_MODE"] == "disabled"
    assert not (tmp_path / "runs" / "wandb").exists()
