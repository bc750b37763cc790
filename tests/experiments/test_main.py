"""experiments.main chains every stage on the tiny model, and a second run reuses what exists."""

from __future__ import annotations

import json

import pytest

from experiments import main as main_job

TINY = [
    "--set", "env.model=tiny-random-llama", "--set", "env.shots=0", "--set", "env.interval=16",
    "--set", "env.group_size=16", "--set", "env.eval_size=20",
    "--set", "collect.episodes=2", "--set", "collect.calibration_episodes=2",
    "--set", "train_mlp.epochs=2", "--set", "train_ppo.total_timesteps=32",
    "--set", "train_ppo.algo_kwargs={n_steps: 16, batch_size: 16, n_epochs: 1}",
    "--set", "train_ppo.checkpoint_every=16", "--set", "evaluate.items=2",
    "--set", "baselines=[fp16, 'fixed:2', 'quanto:4']",
]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_main_job_end_to_end_then_resumes(tmp_path, capsys):
    out = tmp_path / "main"
    args = ["--config", "experiments/configs/main.yaml", *TINY, "--set", f"out_dir={out}"]
    assert main_job.main(args) == 0
    for path in ("collect/controller_training.csv", "collect/rule_thresholds.yaml", "train_mlp/mlp.pt",
                 "train_ppo/ppo.zip", "evaluate/summary.json", "report.md", "pareto.png", "config.yaml"):
        assert (out / path).exists(), path
    policies = json.loads((out / "evaluate" / "summary.json").read_text())["policies"]
    assert set(policies) == {"fp16", "fixed-2", "quanto-4", "rule", "mlp", "ppo"}
    capsys.readouterr()
    assert main_job.main(args) == 0  # everything exists: stages are skipped, evaluation has nothing to do
    printed = capsys.readouterr().out
    assert printed.count("skipping") == 3


def test_unknown_stage_and_key(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        main_job.main(["--set", "stages=[collect, dance]", "--set", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit):
        main_job.main(["--set", "colect.episodes=3"])
