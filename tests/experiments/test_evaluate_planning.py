"""experiments.evaluate with planning policies (the oracle) and static schedules on the tiny model."""

from __future__ import annotations

import pytest

from agents.rollout import Schedule, rollout
from agents.static import StaticSchedulePolicy
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments import evaluate
from experiments.evaluate import EvaluateConfig


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_oracle_and_static_records_are_like_every_policys(tmp_path):
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="eval")
    schedule = StaticSchedulePolicy(("progress",), env.bits, ["4", "2"]).save(tmp_path / "schedule.json")
    cfg = EvaluateConfig(env=env, policies=["fixed:4", "oracle:4", f"static:{schedule}"], items=2,
                         references=("fixed:4",), out_dir=str(tmp_path / "eval"), progress=False)
    result = evaluate.run(cfg)
    records = evaluate._load_done(tmp_path / "eval" / "records.jsonl")[0]
    by = {(r["policy"], r["row"]): r for r in records}
    rows = sorted({r["row"] for r in records})
    assert len(rows) == 2 and len(records) == 6
    replay_env = KVPrecisionEnv(env)
    for row in rows:
        fixed, oracle = by["fixed:4", row], by["oracle:4", row]
        assert set(oracle) == set(fixed) | {"actions"} and set(by["static", row]) == set(fixed)
        assert oracle["loglik_delta"] >= fixed["loglik_delta"]  # completing at 4 bits: never worse than fixed:4
        # a planning policy's record keeps its plan, and replaying the plan is its episode
        replay = rollout(replay_env, Schedule(oracle["actions"]), options={"row": row}).final_info
        assert replay["loglik_delta"] == oracle["loglik_delta"]
    replay_env.close()
    assert set(result["policies"]) == {"fixed:4", "oracle:4", "static"}


def test_evidence_teacher_evaluates_like_every_policy(tmp_path):
    env = EnvConfig(model="tiny-random-llama", task="passkey", interval=32, group_size=32, eval_size=4, split="eval",
                    bit_budget=3.0, task_options={"length": 320, "items": 12, "depth": 0.5, "keys": 1})
    cfg = EvaluateConfig(env=env, policies=["fixed:2", "evidence"], items=1, references=("fixed:2",),
                         out_dir=str(tmp_path / "eval"), progress=False)
    evaluate.run(cfg)
    records = evaluate._load_done(tmp_path / "eval" / "records.jsonl")[0]
    by = {r["policy"]: r for r in records}
    assert set(by) == {"fixed:2", "evidence"} and set(by["evidence"]) == set(by["fixed:2"]) | {"actions"}
    assert "exact_match" in by["evidence"] and by["evidence"]["budget_enforced"] == 0
    assert by["fixed:2"]["avg_bits"] < by["evidence"]["avg_bits"] <= 3.0
