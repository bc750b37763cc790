"""experiments.evaluate on the tiny model: same items for every policy, resume, baselines, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from envs.kv_precision import EnvConfig
from experiments import evaluate
from experiments.evaluate import EvaluateConfig


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _cfg(tmp_path, **kw) -> EvaluateConfig:
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="eval")
    base = dict(env=env, policies=["fp16", "fixed:2", "fixed:4"], items=3, out_dir=str(tmp_path / "eval"), progress=False)
    base.update(kw)
    return EvaluateConfig(**base)


def _records(tmp_path):
    return evaluate._load_done(tmp_path / "eval" / "records.jsonl")[0]


def test_every_policy_runs_the_same_items_and_summary_is_paired(tmp_path):
    result = evaluate.run(_cfg(tmp_path, policies=["fp16", "fixed:2", "fixed:4", "rule", "quanto:4"]))
    records = _records(tmp_path)
    by_policy: dict[str, set[int]] = {}
    for r in records:
        by_policy.setdefault(r["policy"], set()).add(r["row"])
    assert set(by_policy) == {"fp16", "fixed:2", "fixed:4", "rule", "quanto:4"}
    assert len({frozenset(rows) for rows in by_policy.values()}) == 1  # identical item sets
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["config"]["items"] == 3
    assert summary["references"] == ["fp16", "fixed:4"]
    fixed2 = result["policies"]["fixed:2"]
    assert fixed2["summary"]["avg_bits"]["mean"] == pytest.approx(2.0)
    assert fixed2["summary"]["kv_ratio"]["mean"] < 0.3
    assert set(fixed2["paired"]) == {"fp16", "fixed:4"}
    fp16 = result["policies"]["fp16"]["summary"]
    assert fp16["kv_ratio"]["mean"] == pytest.approx(1.0)
    assert fp16["loglik_delta"]["mean"] == pytest.approx(0.0, abs=1e-2)  # fp16 KV vs fp32 reference


def test_fp16_policy_agrees_with_the_full_precision_reference(tmp_path):
    evaluate.run(_cfg(tmp_path, policies=["fp16"], references=["fp16"], items=4))
    from envs.kv_precision import KVPrecisionEnv

    env = KVPrecisionEnv(_cfg(tmp_path).env)
    for r in _records(tmp_path):
        ref = env.reference_for(r["row"])
        assert (r["pred"], r["pred_norm"]) == (ref.pred, ref.pred_norm)
    env.close()


def test_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    calls = []
    real = evaluate._run_policy

    def flaky(env, row, policy):
        calls.append((policy.name, row))
        if len(calls) == 4:
            raise KeyboardInterrupt  # interrupted mid-run
        return real(env, row, policy)

    monkeypatch.setattr(evaluate, "_run_policy", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(_cfg(tmp_path))
    assert len(_records(tmp_path)) == 3  # what finished before the interruption is kept
    assert not (tmp_path / "eval" / "summary.json").exists()
    calls.clear()
    monkeypatch.setattr(evaluate, "_run_policy", real)
    result = evaluate.run(_cfg(tmp_path))
    records = _records(tmp_path)
    assert len(records) == 9
    assert len({(r["policy"], r["row"]) for r in records}) == 9  # nothing ran twice
    assert all(entry["summary"]["items"] == 3 for entry in result["policies"].values())


def test_shards_split_the_items_and_the_last_one_writes_the_summary(tmp_path):
    first = evaluate.run(_cfg(tmp_path, items=4, shard=0, shards=2))
    assert first["policies"] is None and not (tmp_path / "eval" / "summary.json").exists()
    assert len(_records(tmp_path)) == 6  # 2 of the 4 items x 3 policies
    second = evaluate.run(_cfg(tmp_path, items=4, shard=1, shards=2))
    records = _records(tmp_path)
    assert len({(r["policy"], r["row"]) for r in records}) == len(records) == 12
    assert all(entry["summary"]["items"] == 4 for entry in second["policies"].values())
    unsharded = evaluate.run(_cfg(tmp_path, items=4))  # nothing left to run: the same summary again
    assert len(_records(tmp_path)) == 12
    assert unsharded["policies"] == second["policies"]


def test_a_line_cut_short_by_a_kill_is_run_again(tmp_path):
    evaluate.run(_cfg(tmp_path, items=2))
    path = tmp_path / "eval" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])  # the last record half written
    result = evaluate.run(_cfg(tmp_path, items=2))
    records = _records(tmp_path)
    assert len(records) == 6 and len({(r["policy"], r["row"]) for r in records}) == 6
    assert all(entry["summary"]["items"] == 2 for entry in result["policies"].values())


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="shard"):
        evaluate.run(_cfg(tmp_path, shard=2, shards=2))
    with pytest.raises(ValueError, match="items"):
        evaluate.run(_cfg(tmp_path, items=0))
    with pytest.raises(FileNotFoundError):
        evaluate.run(_cfg(tmp_path, policies=["mlp:/nonexistent/mlp.pt"], references=[]))
    with pytest.raises(ValueError, match="nbits"):
        evaluate.run(_cfg(tmp_path, policies=["quanto:3"], references=[]))
    # a reference naming no evaluated policy fails before any model is loaded, listing the names
    with pytest.raises(ValueError, match=r"references \['fixed-4'\] name no evaluated policy.*'fixed:4'"):
        evaluate.run(_cfg(tmp_path, references=["fp16", "fixed-4"]))
    with pytest.raises(ValueError, match=r"several policies are named \['rule'\]"):
        evaluate.run(_cfg(tmp_path, policies=["fp16", "rule", "rule:2.0,2.8,3.5"], references=[]))
    assert not (tmp_path / "eval" / "records.jsonl").exists()
    with pytest.raises(SystemExit):
        evaluate.main(["--set", "itemz=3"])


def _rewrite_fingerprints(tmp_path, fingerprint):
    path = tmp_path / "eval" / "records.jsonl"
    records = _records(tmp_path)
    for r in records:
        r.pop("fingerprint")
        if fingerprint is not None:
            r["fingerprint"] = fingerprint
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_records_carry_the_fingerprint_and_the_summary_lists_it(tmp_path):
    from envs.fingerprint import fingerprint, fingerprint_id

    evaluate.run(_cfg(tmp_path, items=2))
    here = fingerprint("cpu", "float32")
    assert {r["fingerprint"] for r in _records(tmp_path)} == {fingerprint_id(here)}
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["fingerprints"] == {fingerprint_id(here): {"records": 6, "fingerprint": here}}
    assert here["cpu"]["capability"] and "threads" not in json.dumps(here)


def test_a_resume_on_another_machine_is_refused_unless_allowed(tmp_path):
    evaluate.run(_cfg(tmp_path, items=2))
    _rewrite_fingerprints(tmp_path, "0123456789ab")  # as if computed on another machine
    with pytest.raises(ValueError, match=r"'0123456789ab'.*allow_mixed_fingerprints"):
        evaluate.run(_cfg(tmp_path, items=3))
    assert len(_records(tmp_path)) == 6  # nothing was added
    evaluate.run(_cfg(tmp_path, items=2))  # nothing left to run: summarising mixes nothing
    result = evaluate.run(_cfg(tmp_path, items=3, allow_mixed_fingerprints=True))
    here = _records(tmp_path)[-1]["fingerprint"]
    assert here != "0123456789ab"
    assert {fp: v["records"] for fp, v in result["fingerprints"].items()} == {"0123456789ab": 6, here: 3}
    assert result["fingerprints"]["0123456789ab"]["fingerprint"] is None  # not described in fingerprints.json
    # every row's records share one fingerprint here, so every item is paired
    assert result["policies"]["fixed:2"]["paired"]["fp16"]["items"] == 3


def test_records_from_before_fingerprints_are_summarised_as_unknown(tmp_path):
    evaluate.run(_cfg(tmp_path, items=2))
    _rewrite_fingerprints(tmp_path, None)
    result = evaluate.run(_cfg(tmp_path, items=2))
    assert result["fingerprints"] == {"unknown": {"records": 6, "fingerprint": None}}
    with pytest.raises(ValueError, match="'unknown'"):
        evaluate.run(_cfg(tmp_path, items=3))


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0
    assert "policies" in capsys.readouterr().out


def test_policies_with_their_own_env_settings_run_on_the_same_items(tmp_path):
    """``fixed:k4v2+s4`` runs on a sibling env (4 fp16 sink tokens, K4V2 in its menu) beside ``fixed:4``."""
    policies = ["fixed:k4v2+s4", "fixed:4", "fixed:k4v2", "fixed:2"]
    evaluate.run(_cfg(tmp_path, policies=policies, references=["fixed:4"], items=2))
    by = {(r["policy"], r["row"]): r for r in _records(tmp_path)}
    rows = {row for _, row in by}
    assert {name for name, _ in by} == set(policies) and len(rows) == 2
    for row in rows:
        sunk, k4v2 = by["fixed:k4v2+s4", row], by["fixed:k4v2", row]
        assert k4v2["avg_bits"] == 3 and sunk["avg_bits"] > 3  # sinks count 16
        assert by["fixed:2", row]["kv_bytes"] < sunk["kv_bytes"] < by["fixed:4", row]["kv_bytes"]
        assert sunk["fp16_kv_bytes"] == by["fixed:4", row]["fp16_kv_bytes"]  # same prompt, same tokens


def test_policy_names_are_canonical(tmp_path):
    with pytest.raises(ValueError, match=r"several policies are named \['fixed:k4v2'\]"):
        evaluate.run(_cfg(tmp_path, policies=["fixed:k4v2", "fixed:K4V2+s0"], references=[]))


def test_under_a_budget_fixed_settings_play_as_named_and_learned_ones_keep_the_budget(tmp_path):
    env = dataclasses.replace(_cfg(tmp_path).env, bit_budget=3.0)
    result = evaluate.run(_cfg(tmp_path, env=env, policies=["fp16", "fixed:4", "fixed:2", "rule", "quanto:4"],
                               references=["fp16"]))
    records = _records(tmp_path)
    assert all(isinstance(r["budget_enforced"], int) for r in records)
    fixed4 = [r for r in records if r["policy"] == "fixed:4"]
    assert all(r["avg_bits"] == pytest.approx(4.0) and r["budget_enforced"] == 0 for r in fixed4)  # no budget
    assert result["policies"]["fp16"]["summary"]["avg_bits"]["mean"] == pytest.approx(16.0)
    rule = [r for r in records if r["policy"] == "rule"]  # the default thresholds ask for more than 3 bits...
    assert all(r["avg_bits"] <= 3.0 + 1e-9 for r in rule)
    assert all(r["budget_enforced"] == 0 for r in rule)  # ...and the rule reads the mask: the env replaces nothing


def test_policy_env_runs_one_policy_under_its_own_budget_beside_budgetless_ones(tmp_path):
    result = evaluate.run(_cfg(tmp_path, policies=["fp16", "rule", "rule-b3=rule"], references=["fp16"],
                               policy_env={"rule-b3": {"bit_budget": 3.0}}))
    records = _records(tmp_path)
    free = [r["avg_bits"] for r in records if r["policy"] == "rule"]
    budgeted = [r["avg_bits"] for r in records if r["policy"] == "rule-b3"]
    assert max(free) > 3.0  # the default thresholds ask for more than 3 bits without a budget...
    assert len(budgeted) == 3 and max(budgeted) <= 3.0 + 1e-9  # ...and keep 3.0 under theirs
    assert result["policies"]["rule-b3"]["paired"]["fp16"]["items"] == 3
    with pytest.raises(ValueError, match="policy_env names"):
        evaluate.run(_cfg(tmp_path, policy_env={"oracle": {"bit_budget": 3.0}}))
    with pytest.raises(ValueError, match="policy_env must map"):
        evaluate.run(_cfg(tmp_path, policy_env={"fp16": 3.0}))


def test_records_count_the_steps_the_env_replaced_to_keep_its_budget(tmp_path):
    from agents.rollout import Schedule
    from envs.kv_precision import KVPrecisionEnv

    env = KVPrecisionEnv(dataclasses.replace(_cfg(tmp_path).env, bit_budget=3.0))
    row = env.items[0].row
    blocks = -(-len(env.episode_inputs(row)[1]) // env.config.interval)
    fp16 = env.bits.index(16)
    record = evaluate._run_policy(env, row, Schedule([fp16] * blocks))  # a schedule ignores masks: the env enforces
    assert record["avg_bits"] <= 3.0 + 1e-9
    assert 0 < record["budget_enforced"] <= blocks
    env.close()


def test_policy_items_limit_a_costly_policy_to_the_first_items_and_pair_on_them(tmp_path):
    result = evaluate.run(_cfg(tmp_path, policies=["fp16", "fixed:2", "fixed:4"], policy_items={"fixed:2": 1}))
    rows = {}
    for r in _records(tmp_path):
        rows.setdefault(r["policy"], []).append(r["row"])
    assert len(rows["fp16"]) == 3 and rows["fixed:2"] == rows["fp16"][:1]
    assert result["policies"]["fixed:2"]["summary"]["items"] == 1
    assert result["policies"]["fixed:2"]["paired"]["fp16"]["items"] == 1
    assert result["policies"]["fixed:4"]["paired"]["fp16"]["items"] == 3
    with pytest.raises(ValueError, match="policy_items"):
        evaluate.run(_cfg(tmp_path, policy_items={"oracle": 1}))
    with pytest.raises(ValueError, match="policy_items"):
        evaluate.run(_cfg(tmp_path, policy_items={"fp16": 0}))


def test_a_named_comparison_writes_its_own_summary_and_shares_the_records(tmp_path):
    evaluate.run(_cfg(tmp_path, name="b2"))
    out = tmp_path / "eval"
    assert (out / "summary_b2.json").exists() and (out / "config_b2.yaml").exists()
    assert not (out / "summary.json").exists()
    assert evaluate.summary_file(_cfg(tmp_path, name="b2")) == out / "summary_b2.json"
    n = len(_records(tmp_path))
    evaluate.run(_cfg(tmp_path, name="b4", policies=["fp16", "fixed:4"], references=["fp16"]))
    assert len(_records(tmp_path)) == n  # every episode was already recorded by the first comparison
    assert set(json.loads((out / "summary_b4.json").read_text())["policies"]) == {"fp16", "fixed:4"}
    assert set(json.loads((out / "summary_b2.json").read_text())["policies"]) == {"fp16", "fixed:2", "fixed:4"}
    with pytest.raises(ValueError, match="file-name part"):
        evaluate.run(_cfg(tmp_path, name="a/b"))


def test_recorded_policies_are_summarised_and_paired_without_running(tmp_path):
    evaluate.run(_cfg(tmp_path, policies=["fp16", "fixed:2"], references=["fp16"]))
    n = len(_records(tmp_path))
    # another menu: fixed:2 is no longer runnable here, but its records still pair on the same items
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="eval",
                    bits=[4, 8, 16])
    result = evaluate.run(_cfg(tmp_path, env=env, policies=["fp16", "fixed:4"], recorded=["fixed:2"],
                               references=["fixed:2"], name="other"))
    assert len(_records(tmp_path)) == n + 3  # only fixed:4 ran
    assert set(result["policies"]) == {"fp16", "fixed:4", "fixed:2"}
    assert result["policies"]["fixed:4"]["paired"]["fixed:2"]["items"] == 3
    with pytest.raises(ValueError, match="both run"):
        evaluate.run(_cfg(tmp_path, recorded=["fixed:2"]))
    with pytest.raises(ValueError, match="no records"):
        evaluate.run(_cfg(tmp_path, policies=["fp16"], recorded=["fixed:8"], references=["fp16"]))
