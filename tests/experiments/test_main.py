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
    "--set", "train_ppo.checkpoint_every=16", "--set", "search_static.episodes=train-0-2",
    "--set", "evaluate.items=2", "--set", "evaluate.policy_items={oracle: 1}",
    "--set", "baselines=[fp16, 'fixed:2+s4', 'quanto:4', oracle]", "--set", "evaluate.references=[fp16, rule]",
]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_main_job_end_to_end_then_resumes(tmp_path, capsys):
    out = tmp_path / "main"
    args = ["--config", "experiments/configs/main.yaml", *TINY, "--set", f"out_dir={out}"]
    assert main_job.main(args) == 0
    for path in ("collect/controller_training.csv", "collect/rule_thresholds.yaml", "train_mlp/mlp.pt",
                 "train_ppo/maskableppo.zip", "search_static/schedule.json", "search_static/config.yaml",
                 "evaluate/summary.json", "report.md", "pareto.png", "config.yaml"):
        assert (out / path).exists(), path
    policies = json.loads((out / "evaluate" / "summary.json").read_text())["policies"]
    assert set(policies) == {"fp16", "fixed:2+s4", "quanto:4", "oracle", "rule", "mlp", "maskableppo", "static"}
    assert set(policies["mlp"]["paired"]) == {"fp16", "rule"}  # every configured comparison reaches the report
    assert policies["oracle"]["summary"]["items"] == 1 and policies["mlp"]["summary"]["items"] == 2  # policy_items
    budget = 3.0  # main.yaml's env.bit_budget: the learned and searched policies keep it, fp16 runs as it is
    records = [json.loads(line) for line in (out / "evaluate" / "records.jsonl").read_text().splitlines()]
    for record in records:
        if record["policy"] in ("rule", "mlp", "maskableppo", "static", "oracle"):
            assert record["avg_bits"] <= budget + 1e-9, record
    assert policies["fp16"]["summary"]["avg_bits"]["mean"] == 16.0
    assert policies["fp16"]["summary"]["budget_enforced"]["mean"] == 0.0
    report_md = (out / "report.md").read_text()
    assert "vs rule" in report_md and "vs fp16" in report_md
    capsys.readouterr()
    assert main_job.main(args) == 0  # everything exists: stages are skipped, evaluation has nothing to do
    printed = capsys.readouterr().out
    assert printed.count("skipping") == 4


def test_unknown_stage_and_key(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        main_job.main(["--set", "stages=[collect, dance]", "--set", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit):
        main_job.main(["--set", "colect.episodes=3"])


def _parse(tmp_path, *extra):
    return main_job.parse(["--config", "experiments/configs/main.yaml", *TINY, "--set", f"out_dir={tmp_path}", *extra])


def test_stage_env_is_an_overlay_of_the_top_level_env(tmp_path):
    cfg = _parse(tmp_path, "--set", "train_ppo.env.rewards={ending_loglik: 1.0}", "--set", "env.shots=2")
    assert cfg.train_ppo.env.rewards == {"ending_loglik": 1.0}  # the overlay is honored...
    assert cfg.train_ppo.env.shots == 2 and cfg.train_ppo.env.model == "tiny-random-llama"  # ...over the top env
    assert cfg.collect.env.rewards == cfg.env.rewards == cfg.evaluate.env.rewards  # other stages keep the top env
    assert (cfg.collect.env.split, cfg.train_ppo.env.split, cfg.search_static.env.split, cfg.evaluate.env.split) \
        == ("train", "train", "train", "eval")
    assert cfg.search_static.env.bit_budget == cfg.env.bit_budget == 3.0  # every stage runs under the budget
    assert cfg.train_mlp.bits == cfg.env.bits
    assert cfg.search_static.out == str(tmp_path / "search_static" / "schedule.json")
    assert f"static:{cfg.search_static.out}" in cfg.evaluate.policies


def test_without_a_budget_there_is_no_static_schedule(tmp_path):
    cfg = _parse(tmp_path, "--set", "env.bit_budget=null")
    assert not any(spec.startswith("static:") for spec in cfg.evaluate.policies)


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("train_mlp.bits=[2, 4]", "env.bits"),
        ("evaluate.policies=[fp16]", "baselines"),
        ("collect.out_dir=elsewhere", "out_dir"),
        ("train_ppo.resume=false", "redo"),
        ("train_ppo.env.split=eval", "nowhere"),
        ("search_static.out=elsewhere.json", "out_dir"),
        ("env.split=eval", "set by the job per stage"),
        ("train_mlp.env.shots=3", "has no env of its own"),
    ],
)
def test_a_derived_key_cannot_be_set_where_it_would_be_ignored(tmp_path, override, where):
    with pytest.raises(SystemExit) as exc_info:
        _parse(tmp_path, "--set", override)
    assert exc_info.value.code != 0


def test_derived_key_error_names_where_it_belongs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc_info:
        _parse(tmp_path, "--set", "train_mlp.bits=[2, 4]")
    assert "env.bits" in str(exc_info.value) + capsys.readouterr().err


def test_saved_record_is_what_every_stage_ran_and_reloads(tmp_path):
    import yaml

    out = tmp_path / "main"
    args = ["--config", "experiments/configs/main.yaml", *TINY, "--set", f"out_dir={out}",
            "--set", "train_ppo.env.rewards={ending_loglik: 1.0, memory: 0.5}"]
    assert main_job.main(args) == 0
    record = yaml.safe_load((out / "config.yaml").read_text())
    for stage in ("collect", "train_mlp", "train_ppo", "search_static", "evaluate"):
        saved = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert record[stage] == saved, stage
    assert record["train_ppo"]["env"]["rewards"] == {"ending_loglik": 1.0, "memory": 0.5}
    # the record re-runs as it is (derived keys hold their derived values), and a partial run keeps its own record
    before = (out / "config.yaml").read_text()
    reloaded = main_job.parse(["--config", str(out / "config.yaml"), "--set", "stages=[evaluate]"])
    assert reloaded.train_ppo == main_job.resolve(reloaded).train_ppo
    assert main_job.main(["--config", str(out / "config.yaml"), "--set", "stages=[evaluate, report]"]) == 0
    assert (out / "config.yaml").read_text() == before
    assert (out / "config.evaluate+report.yaml").exists()
