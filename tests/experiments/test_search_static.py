"""experiments.search_static on the tiny model: deterministic, within budget, never worse than its start."""

from __future__ import annotations

import json

import pytest

from agents.registry import make_policy
from agents.static import StaticSchedulePolicy
from envs.kv_precision import EnvConfig
from experiments import search_static
from experiments.search_static import SearchStaticConfig

BUDGET = 3.0


def _cfg(tmp_path, name: str, **kw) -> SearchStaticConfig:
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="train",
                    bits=(2, (4, 2), 4, 8))
    base = dict(env=env, bit_budget=BUDGET, episodes="train-0-2", bins=2, max_passes=2,
                out=str(tmp_path / name), progress=False)
    return SearchStaticConfig(**{**base, **kw})


def test_search_is_deterministic_and_within_budget(tmp_path):
    first = search_static.run(_cfg(tmp_path, "a.json", start="fixed"))
    second = search_static.run(_cfg(tmp_path, "b.json", start="fixed"))
    assert first["schedule"] == second["schedule"] and first["objective"] == second["objective"]
    assert first["max_avg_bits"] <= BUDGET + 1e-9
    assert first["objective"] >= first["start"]["objective"]
    assert first["start"]["setting"] in ("2", "k4v2")  # the settings whose mean bits fit 3.0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["budget"] == BUDGET and doc["bins"] == 2 and doc["rows"] == first["rows"] and len(first["rows"]) == 2
    assert [e["stage"] for e in doc["log"][:2]] == ["start", "start"]
    assert any(e["stage"] == "pass 1" for e in doc["log"])
    policy = make_policy(f"static:{tmp_path / 'a.json'}", ("progress",), (2, (4, 2), 4, 8))
    assert isinstance(policy, StaticSchedulePolicy) and policy.schedule_names() == first["schedule"]


def test_search_on_explicit_rows_and_bad_config(tmp_path):
    cfg = _cfg(tmp_path, "c.json", max_passes=0)
    rows = search_static.run(cfg)["rows"]
    again = search_static.run(_cfg(tmp_path, "d.json", max_passes=0, rows=list(reversed(rows))))
    assert sorted(again["rows"]) == sorted(rows)
    with pytest.raises(ValueError, match="split must be 'train'"):
        search_static.run(_cfg(tmp_path, "e.json", env=EnvConfig(model="tiny-random-llama", split="eval")))
    with pytest.raises(ValueError, match="needs a budget"):
        search_static.run(_cfg(tmp_path, "f.json", bit_budget=None))
    with pytest.raises(ValueError, match="no fixed setting"):
        search_static.run(_cfg(tmp_path, "g.json", bit_budget=1.5))
    with pytest.raises(ValueError, match="train-split rows"):
        search_static.run(_cfg(tmp_path, "h.json", rows=[-1]))


def test_with_sink_tokens_a_schedule_the_budget_cuts_short_is_infeasible_not_an_error(tmp_path):
    """4 fp16 sinks lift K4V2 everywhere over 3.0 bits: the policy's own mask fallback replaces its last
    blocks (the env then has nothing to enforce), and the search must count that schedule infeasible."""
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="train",
                    bits=(2, (4, 2), 4, 8), sink_tokens=4, bit_budget=BUDGET)
    result = search_static.run(_cfg(tmp_path, "s.json", env=env, max_passes=1, start="fixed"))
    assert result["start"]["setting"] == "2"  # K4V2 fits 3.0 by its mean bits, not with the sinks
    doc = json.loads((tmp_path / "s.json").read_text())
    k4v2 = next(e for e in doc["log"] if e["stage"] == "start" and e["setting"] == "k4v2")
    assert not k4v2["feasible"]
    assert result["max_avg_bits"] <= BUDGET + 1e-9


def test_mixed_start_fills_the_budget_and_swaps_run(tmp_path):
    """With the sinks, K4V2 everywhere is over 3.0 bits: the mixed start puts K4V2 on as many bins as stay
    within it (never worse than the best fixed start, which competes), and each pass tries paired moves."""
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="train",
                    bits=(2, (4, 2), 4, 8), sink_tokens=4, bit_budget=BUDGET)
    result = search_static.run(_cfg(tmp_path, "m.json", env=env, bins=4, max_passes=1))
    doc = json.loads((tmp_path / "m.json").read_text())
    starts = [e for e in doc["log"] if e["stage"] == "start"]
    fixed_best = max(e["objective"] for e in starts if e["feasible"] and " on the " not in e["setting"])
    mixed = [e for e in starts if " on the " in e["setting"]]
    assert mixed and any(e["feasible"] for e in mixed)
    assert result["start"]["objective"] >= fixed_best
    assert result["objective"] >= result["start"]["objective"] and result["max_avg_bits"] <= BUDGET + 1e-9
    assert any(e["stage"] == "pass 1 swaps" for e in doc["log"])
    again = search_static.run(_cfg(tmp_path, "m2.json", env=env, bins=4, max_passes=1))
    assert again["schedule"] == result["schedule"]
    with pytest.raises(ValueError, match="start must be"):
        search_static.run(_cfg(tmp_path, "x.json", env=env, start="random"))


def test_schedules_the_plan_shows_over_budget_are_not_run_and_the_search_is_unchanged(tmp_path, monkeypatch):
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, group_size=16, eval_size=20, split="train",
                    bits=(2, (4, 2), 4, 8), sink_tokens=4, bit_budget=BUDGET)
    fast = search_static.run(_cfg(tmp_path, "f.json", env=env, bins=4, max_passes=1))
    assert fast["episodes_skipped"] > 0
    monkeypatch.setattr(search_static.ScheduleScorer, "_fits", lambda self, row, actions: True)  # run them all
    slow = search_static.run(_cfg(tmp_path, "s.json", env=env, bins=4, max_passes=1))
    assert slow["episodes_skipped"] == 0 and slow["episodes_run"] == fast["episodes_run"] + fast["episodes_skipped"]
    assert (fast["schedule"], fast["objective"], fast["start"]) == (slow["schedule"], slow["objective"], slow["start"])
    feasible = lambda path: [e["feasible"] for e in json.loads(path.read_text())["log"]]  # noqa: E731
    assert feasible(tmp_path / "f.json") == feasible(tmp_path / "s.json")  # the same verdict on every schedule
