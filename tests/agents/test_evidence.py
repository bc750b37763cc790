"""The evidence teacher: within budget, deterministic, evidence blocks at the high setting, spare bits from the end."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envs"))
from _passkey_source import SOURCE  # noqa: E402

from agents.evidence import EvidencePolicy, plan_settings  # noqa: E402
from agents.registry import canonical_name, make_policy  # noqa: E402
from agents.rollout import Schedule, rollout  # noqa: E402
from envs.budget import (
    block_bit_sum,  # noqa: E402
    plan_fits,  # noqa: E402
)
from envs.kv_precision import KVPrecisionEnv  # noqa: E402
from envs.settings import mean_bits, settings_by_cost  # noqa: E402

MENU = (2, (4, 2), 4, 8, 16)
BUDGETS = (2.5, 3.0, 4.0, 8.0)


def _env(tiny_model, depth, **overrides) -> KVPrecisionEnv:
    model, tokenizer = tiny_model
    config = dict(model="tiny-random-llama", task="passkey", interval=32, group_size=32, eval_size=4, bits=MENU,
                  task_options={"length": 384, "items": 8, "depth": depth, "keys": 1})
    return KVPrecisionEnv(lm=model, tokenizer=tokenizer, items=SOURCE, **{**config, **overrides})


def _average_bits(plan, spans, sinks=0) -> float:
    return sum(block_bit_sum(MENU[a], s, e, sinks) for a, (s, e) in zip(plan, spans, strict=True)) / spans[-1][1]


def test_an_explicit_budget_on_an_env_without_one(tiny_model):
    env = _env(tiny_model, 0.25)
    teacher = EvidencePolicy(env.observation_names, env.bits, budget=2.5)
    plan = teacher.plan(env, env.items[0].row)
    assert _average_bits(plan, env.block_spans()) <= 2.5
    assert rollout(env, Schedule(plan), options={"row": env.items[0].row}).final_info["avg_bits"] <= 2.5
    assert {MENU[plan[b]] for b in teacher.last_evidence} != {2}  # the needle still gets more than the rest
    env.close()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_teacher_within_budget_deterministic_and_keeps_the_needle(tiny_model, depth):
    env = _env(tiny_model, depth)
    rank = {i: r for r, i in enumerate(settings_by_cost(MENU))}
    for budget in BUDGETS:
        env_b = env.sibling(bit_budget=budget)
        teacher = make_policy("evidence", env=env_b)
        for item in env_b.items[:2]:
            plan = teacher.plan(env_b, item.row)
            evidence = teacher.last_evidence
            assert evidence and teacher.plan(env_b, item.row) == plan  # deterministic
            episode = rollout(env_b, Schedule(plan), options={"row": item.row})
            assert [i["budget_enforced"] for i in episode.infos] == [False] * len(plan)  # never pushed back
            assert episode.final_info["avg_bits"] <= budget
            spans = env_b.block_spans()
            # evidence blocks: one setting, the dearest that fits with the cheapest elsewhere
            top = {plan[b] for b in evidence}
            assert len(top) == 1 and all(rank[plan[b]] <= rank[plan[evidence[0]]] for b in range(len(plan)))
            dearer = [i for i in settings_by_cost(MENU) if rank[i] > rank[plan[evidence[0]]]]
            for i in dearer:
                trial = [i if b in evidence else settings_by_cost(MENU)[0] for b in range(len(plan))]
                assert not plan_fits(MENU, budget, spans, trial, 0)
            # the spare budget is spent: no single other block can be raised one step and still fit
            for b in range(len(plan)):
                up = [i for i in settings_by_cost(MENU) if rank[i] == rank[plan[b]] + 1]
                if b not in evidence and up and rank[up[0]] <= rank[plan[evidence[0]]]:
                    assert not plan_fits(MENU, budget, spans, [up[0] if k == b else a for k, a in enumerate(plan)], 0)
        env_b.close()
    env.close()


def test_generous_budget_gives_the_needle_16_bits_and_a_tight_one_less(tiny_model):
    env = _env(tiny_model, 0.5, bit_budget=8.0)
    teacher = make_policy("evidence", env=env)
    row = env.items[0].row
    plan = teacher.plan(env, row)
    assert {MENU[plan[b]] for b in teacher.last_evidence} == {16}
    assert MENU[plan[-1]] != 2  # the spare budget starts at the question's block
    tight = env.sibling(bit_budget=2.5)
    plan = make_policy("evidence", env=tight).plan(tight, row)
    assert mean_bits(MENU[plan[teacher.last_evidence[0]]]) < 16
    env.close()
    tight.close()


def test_named_setting_and_no_budget(tiny_model):
    env = _env(tiny_model, 0.5)
    teacher = make_policy("evidence:8", env=env)
    assert teacher.name == "evidence:8" and canonical_name("evidence:k4v4") == "evidence:4"
    assert canonical_name("evidence") == "evidence"
    plan = teacher.plan(env, env.items[1].row)
    # no budget: the evidence blocks at the named setting, every other block at the cheapest
    assert [MENU[a] for a in plan] == [8 if b in teacher.last_evidence else 2 for b in range(len(plan))]
    with pytest.raises(ValueError, match="not in the env's menu"):
        make_policy("evidence:3", env=env)
    with pytest.raises(TypeError, match="plans per item"):
        teacher.predict(np.zeros(len(env.observation_names), dtype=np.float32))
    env.close()


def test_plan_settings_on_numbers():
    menu = (2, 4, 16)
    spans = [(0, 10), (10, 20), (20, 30), (30, 40)]
    # budget 4 over 40 tokens = 160 bits; evidence block 1 at 16 costs 160 + 3 * 20 = 220: too much; at 4: 100
    assert plan_settings(menu, 4.0, spans, [1], 0) == [1, 1, 1, 1]
    # budget 7: 280 bits; 16 on block 1 (160) + 2 elsewhere (60) = 220; the spare 60 lifts the rest evenly to 4
    assert plan_settings(menu, 7.0, spans, [1], 0) == [1, 2, 1, 1]
    # budget 6: 240 bits; 220 + 20 fits one raise, which goes to the last block
    assert plan_settings(menu, 6.0, spans, [1], 0) == [0, 2, 0, 1]
    # sink tokens count 16: 4 sinks in block 0 cost 56 bits more, so nothing is left for the rest
    assert plan_settings(menu, 7.0, spans, [1], 4) == [0, 2, 0, 0]
    # no evidence: an even spread, then from the end
    assert plan_settings(menu, 3.0, spans, [], 0) == [0, 0, 1, 1]
    # a named cap: evidence never above it, nor anything else
    assert plan_settings(menu, 16.0, spans, [1], 0, evidence_setting=4) == [1, 1, 1, 1]
    # no budget: evidence at the dearest, the rest at the cheapest
    assert plan_settings(menu, None, spans, [1, 2], 0) == [0, 2, 2, 0]


def test_a_budget_too_tight_for_every_evidence_block_raises_them_in_order():
    menu = (2, 4, 16)
    spans = [(0, 10), (10, 20), (20, 30), (30, 40)]
    # budget 2.5: 100 bits; the cheapest everywhere is 80; both evidence blocks at 4 cost 120 (too much), one
    # at 4 costs 100: the first evidence block gets it, the second stays at the cheapest
    assert plan_settings(menu, 2.5, spans, [1, 3], 0) == [0, 1, 0, 0]
    # when both fit at one setting, both get it (the common level), as before
    assert plan_settings(menu, 3.0, spans, [1, 3], 0) == [0, 1, 0, 1]
    # nothing fits beyond the cheapest: the plan stays cheapest everywhere
    assert plan_settings(menu, 2.2, spans, [1, 3], 0) == [0, 0, 0, 0]


def test_a_tight_budget_leaves_the_cheapest_raise_for_later_evidence_blocks():
    menu = (2, (3, 2), 4)  # raises cost 5 (K3V2) and 20 (4) bits on a 10-token block
    spans = [(0, 10), (10, 20), (20, 30), (30, 40)]
    # budget 2.3: 92 bits, 12 spare: both evidence blocks at K3V2 (10) fit at one setting
    assert plan_settings(menu, 2.3, spans, [1, 3], 0) == [0, 1, 0, 1]
    # three evidence blocks, 12 spare: not all three at K3V2 (15); the first two get it, the third nothing
    assert plan_settings(menu, 2.3, [(0, 10), (10, 20), (20, 30), (30, 40)], [0, 1, 3], 0) == [1, 1, 0, 0]
    # 22 spare (2.55): all three at K3V2 (15) is the common level, and the spare 7 lifts the other block
    assert plan_settings(menu, 2.55, spans, [0, 1, 3], 0) == [1, 1, 1, 1]
