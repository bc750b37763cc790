"""experiments.frontier: the grid, the Pareto front and the halving rule by hand; a tiny-model run."""

from __future__ import annotations

import json

import pytest

from envs.kv_precision import EnvConfig
from experiments import evaluate, frontier
from experiments.frontier import FrontierConfig, grid_settings, setting_grid, survivors
from experiments.report import pareto_front


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_grid_has_key_bits_at_least_value_bits_plus_fp16():
    assert setting_grid([2, 3, 4, 8]) == [2, (3, 2), 3, (4, 2), (4, 3), 4, (8, 2), (8, 3), (8, 4), 8, 16]
    specs = [s.spec for s in grid_settings([2, 4], [0, 4])]
    assert specs == ["fixed:2", "fixed:k4v2", "fixed:4", "fp16", "fixed:2+s4", "fixed:k4v2+s4", "fixed:4+s4"]
    assert len(grid_settings([2, 3, 4, 8], [0, 4])) == 21  # 16 bits once: sinks change nothing there


def test_pareto_front_on_a_hand_made_example():
    # (KV ratio: lower is better, Δ gold log-lik: higher is better)
    points = [(1.0, 0.0), (0.3, -0.1), (0.2, -3.0), (0.3, -0.5), (0.25, -0.2), (0.2, -3.5)]
    assert pareto_front(points) == [0, 1, 2, 4]


def _entry(kv_ratio: float, loglik: float) -> dict:
    return {"summary": {"kv_ratio": {"mean": kv_ratio}, "loglik_delta": {"mean": loglik}}}


def test_halving_keeps_the_front_the_best_by_damage_per_byte_and_fp16():
    policies = {
        "fp16": _entry(1.0, 0.0),
        "fixed:4": _entry(0.28, -0.1),  # front; -0.14 nats per fp16 cache saved
        "fixed:k4v2": _entry(0.2, -0.4),  # front; -0.5
        "fixed:2": _entry(0.15, -3.0),  # front (the cheapest), though -3.5 per byte
        "fixed:3": _entry(0.22, -0.5),  # dominated by k4v2, but third best per byte: kept
        "fixed:k8v2": _entry(0.35, -0.45),  # dominated, fourth per byte: dropped
    }
    assert survivors(policies, keep=0.34) == ["fp16", "fixed:4", "fixed:k4v2", "fixed:2", "fixed:3"]
    assert survivors(policies, keep=0.1) == ["fp16", "fixed:4", "fixed:k4v2", "fixed:2"]


def test_bad_config_is_refused(tmp_path):
    for bad in ({"stages": [5, 3]}, {"stages": []}, {"keep": 0.0}, {"sink_tokens": [-1]},
                {"env": EnvConfig(split="eval")}):
        with pytest.raises(ValueError):
            FrontierConfig(out_dir=str(tmp_path), **bad).validate()


def _cfg(tmp_path, **kw) -> FrontierConfig:
    # 0 shots and 64-token blocks: real HellaSwag contexts are a few hundred bytes, so 3-6 blocks each
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=64, group_size=16, eval_size=20, split="train")
    base = dict(env=env, widths=[2, 4], sink_tokens=[0], stages=[2, 3], keep=0.25,
                out_dir=str(tmp_path / "frontier"), progress=False)
    return FrontierConfig(**{**base, **kw})


def test_tiny_frontier_halves_writes_outputs_and_resumes_without_episodes(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    result = frontier.run(cfg)
    out = tmp_path / "frontier"
    for name in ("frontier.json", "frontier.png", "frontier_round1.png", "evaluate/records.jsonl"):
        assert (out / name).is_file(), name
    first, second = result["rounds"]
    assert first["settings"] == ["fixed:2", "fixed:k4v2", "fixed:4", "fp16"]
    assert second["settings"] == first["kept"] and "fp16" in second["settings"]
    assert set(second["kept"]) == set(second["policies"])
    for name, entry in result["settings"].items():
        assert entry["summary"]["items"] == (3 if name in second["settings"] else 2)
        assert entry["paired"].get("fp16") or name == "fp16"
    assert result["settings"]["fixed:k4v2"]["summary"]["avg_bits"]["mean"] == pytest.approx(3.0)
    saved = json.loads((out / "frontier.json").read_text())
    assert saved["pareto_front"] == result["pareto_front"]
    assert "fp16" in saved["pareto_front"]["loglik_delta_vs_kv_ratio"]

    def no_episodes(*args, **kwargs):
        raise AssertionError("a resumed frontier ran an episode")

    monkeypatch.setattr(evaluate, "_run_policy", no_episodes)
    records = (out / "evaluate" / "records.jsonl").read_text()
    again = frontier.run(cfg)
    assert (out / "evaluate" / "records.jsonl").read_text() == records
    assert again["settings"] == result["settings"]


def test_sink_settings_run_beside_the_others_and_latency_costs_are_added(tmp_path):
    from envs.latency import TABLE_KIND

    costs = {"4": 1.06, "4+s4": 1.08, "16": 1.01}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"kind": TABLE_KIND, "label": "cpu-test", "context": 1024, "threads": 1,
                                "settings": {k: {"relative_decode_cost": v} for k, v in costs.items()}}))
    result = frontier.run(_cfg(tmp_path, widths=[4], sink_tokens=[0, 4], stages=[2], latency_table=str(path)))
    settings = result["settings"]
    assert {n: e["relative_decode_cost"] for n, e in settings.items()} == {
        "fixed:4": 1.06, "fp16": 1.01, "fixed:4+s4": 1.08}
    assert result["latency_table"]["label"] == "cpu-test"
    # the 4 sink tokens are fp16: more bytes and bits than plain 4-bit, on the same items
    assert settings["fixed:4+s4"]["summary"]["avg_bits"]["mean"] > settings["fixed:4"]["summary"]["avg_bits"]["mean"]
    assert settings["fixed:4+s4"]["summary"]["kv_bytes"]["mean"] > settings["fixed:4"]["summary"]["kv_bytes"]["mean"]
    assert settings["fixed:4+s4"]["setting"] == {"bits": 4, "sink_tokens": 4, "key": "4+s4"}
    with pytest.raises(KeyError, match=r"no setting .2"):  # checked before any episode runs
        frontier.run(_cfg(tmp_path, stages=[2], latency_table=str(path)))


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exc:
        frontier.main(["--help"])
    assert exc.value.code == 0
    assert "successive halving" in capsys.readouterr().out.lower()
