"""Reward terms on hand-made step views, their weighted sum, and the registry's extension path."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch
from _tiny_env import ITEMS, TINY_CONFIG, make_env

from envs.quantities import StepRecord, StepView
from envs.rewards import DEFAULT_REWARDS, REWARDS, RewardFunction, RewardTerm, register_reward

#: the quantities of a hand-made step, as providers would compute them, and their defaults
QUANTITY_DEFAULTS = dict(
    logprob_delta=-0.75, ending_logprob_delta=0.0, correct_norm=False, reference_correct_norm=False,
    token_logprob_deltas=None, next_span=None, reference=None,
)


def record(**changes) -> StepView:
    """A hand-made step: ``changes`` set record fields or quantities (the rest keep these defaults)."""
    values = {name: changes.pop(name, default) for name, default in QUANTITY_DEFAULTS.items()}
    base = StepRecord(
        bits=4, max_bits=16, block_tokens=64, block_nbytes=300, block_fp16_nbytes=1000, cache_nbytes=1200,
        cache_fp16_nbytes=3000, avg_bits=6.0, step_seconds=0.125, terminal=False,
    )
    return StepView(dataclasses.replace(base, **changes), values=values)


def term(name: str, **params) -> RewardTerm:
    return REWARDS.get(name)(**params)


def test_loglik_adds_the_ending_delta_only_at_the_end():
    assert term("loglik")(record()) == pytest.approx(-0.75)
    assert term("loglik")(record(ending_logprob_delta=-2.0)) == pytest.approx(-0.75)  # ignored mid-episode
    assert term("loglik")(record(terminal=True, logprob_delta=0.0, ending_logprob_delta=-2.0)) == pytest.approx(-2.0)


def test_prompt_loglik_is_the_block_tokens_only_never_the_ending():
    assert term("prompt_loglik")(record(ending_logprob_delta=-2.0)) == pytest.approx(-0.75)
    assert term("prompt_loglik")(record(terminal=True, logprob_delta=-5.0, ending_logprob_delta=-2.0)) == 0.0
    assert REWARDS.get("prompt_loglik").needs == {"logprob_delta"}


def test_prompt_loglik_tokens_counts_only_the_prompts_last_tokens():
    """A 10-token prompt has 9 predictions; the block at positions [4, 8) makes predictions 4..7 (of tokens
    5..8); the last 3 tokens (7, 8, 9) are predictions 6, 7, 8, so this block contributes entries 2 and 3."""
    reference = types.SimpleNamespace(target_logprobs=torch.zeros(9))
    deltas = torch.tensor([-1.0, -2.0, -4.0, -8.0])
    view = record(token_logprob_deltas=deltas, next_span=(4, 8), reference=reference)
    assert term("prompt_loglik", tokens=3)(view) == pytest.approx(-12.0)
    assert term("prompt_loglik", tokens=100)(view) == pytest.approx(-15.0)
    assert term("prompt_loglik", tokens=1)(view) == 0.0  # prediction 8 is in a later block
    assert term("prompt_loglik", tokens=3)(record(terminal=True, token_logprob_deltas=deltas, next_span=(4, 8),
                                                  reference=reference)) == 0.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="tokens"):
            term("prompt_loglik", tokens=bad)


def test_ending_loglik_is_the_gold_ending_only_and_terminal_only():
    assert term("ending_loglik")(record(ending_logprob_delta=-2.0)) == 0.0  # block tokens never count
    assert term("ending_loglik")(record(terminal=True, logprob_delta=-5.0, ending_logprob_delta=-2.0)) == -2.0
    assert REWARDS.get("ending_loglik").needs == {"ending_logprob_delta"}


@pytest.mark.parametrize(
    ("policy", "reference", "expected"), [(True, False, 1.0), (False, True, -1.0), (True, True, 0.0), (False, False, 0.0)]
)
def test_accuracy_is_relative_to_fp16_and_terminal_only(policy, reference, expected):
    outcome = dict(correct_norm=policy, reference_correct_norm=reference)
    assert term("accuracy")(record(terminal=True, **outcome)) == expected
    assert term("accuracy")(record(**outcome)) == 0.0


def test_memory_latency_and_latency_model():
    assert term("memory")(record()) == pytest.approx(-0.3)
    assert term("latency")(record()) == pytest.approx(-0.125)
    assert term("latency_model")(record()) == pytest.approx(-0.4)
    assert REWARDS.get("latency").deterministic is False
    assert all(REWARDS.get(n).deterministic for n in ("loglik", "ending_loglik", "accuracy", "memory", "latency_model", "budget"))


def test_final_budget_charges_only_the_terminal_average():
    assert term("final_budget", target_bits=3.0)(record(avg_bits=4.0)) == 0.0  # mid-episode
    assert term("final_budget", target_bits=3.0)(record(avg_bits=4.0, terminal=True)) == pytest.approx(-1.0 / 16)
    assert term("final_budget", target_bits=3.0)(record(avg_bits=2.5, terminal=True)) == 0.0
    with pytest.raises(ValueError, match="positive"):
        term("final_budget", target_bits=-1)


def test_budget_penalises_only_above_target():
    assert term("budget", target_bits=8.0)(record(avg_bits=6.0)) == 0.0
    assert term("budget", target_bits=4.0)(record(avg_bits=6.0)) == pytest.approx(-2.0 / 16)
    assert term("budget")(record(avg_bits=16.0)) == pytest.approx(-12.0 / 16)  # default target 4 bits
    with pytest.raises(ValueError, match="target_bits must be positive"):
        term("budget", target_bits=0)
    with pytest.raises(TypeError, match="takes no parameters"):
        term("memory", scale=2)


def test_reward_function_weighted_sum_and_spec_forms():
    fn = RewardFunction({"loglik": 2.0, "memory": 0.5, "budget": {"weight": 3.0, "target_bits": 4.0}})
    total, values = fn(record())
    assert values == pytest.approx({"loglik": -0.75, "memory": -0.3, "budget": -2.0 / 16})
    assert total == pytest.approx(2.0 * -0.75 + 0.5 * -0.3 + 3.0 * -2.0 / 16)
    assert fn.deterministic and fn.platform_dependent
    loglik_reads = {"logprob_delta", "ending_logprob_delta", "next_block", "reference", "ending_scores"}
    assert loglik_reads <= fn.quantities
    assert not RewardFunction({"latency": 1.0}).deterministic
    assert RewardFunction({"latency": 1.0}).platform_dependent
    assert not RewardFunction({"memory": 1.0, "latency_model": 1.0, "final_budget": 1.0}).platform_dependent
    assert RewardFunction({"memory": 1.0}).quantities == frozenset()
    assert DEFAULT_REWARDS == {"loglik": 1.0, "memory": 1.0}


def test_unknown_and_empty_reward_specs_list_known_terms():
    with pytest.raises(KeyError, match="unknown reward term 'logilk'; known: .*loglik.*memory"):
        RewardFunction({"logilk": 1.0})
    with pytest.raises(ValueError, match="known: .*loglik"):
        RewardFunction({})


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="'memory' is already registered"):
        register_reward("memory")(type("Other", (RewardTerm,), {}))


ALL_TERMS = {"loglik": 1.0, "accuracy": 2.0, "memory": 0.5, "latency": 0.1, "latency_model": 0.25,
             "budget": {"weight": 1.5, "target_bits": 3.0}}


def test_every_term_in_a_real_episode(tiny_model):
    env = make_env(tiny_model, rewards=ALL_TERMS)
    weights = {k: (v["weight"] if isinstance(v, dict) else v) for k, v in ALL_TERMS.items()}
    env.reset(seed=1)
    done, steps, actions = False, 0, [0, 3, 1, 2]
    while not done:
        _, reward, done, truncated, info = env.step(actions[steps % 4])
        assert not truncated
        terms = info["rewards"]
        assert set(terms) == set(ALL_TERMS)
        assert all(isinstance(v, float) and np.isfinite(v) for v in terms.values())
        assert reward == pytest.approx(sum(weights[k] * v for k, v in terms.items()))
        assert terms["latency"] < 0
        bits = info["bits"]
        if bits == 16:
            assert terms["memory"] == pytest.approx(-1.0)
        else:
            assert -1.0 < terms["memory"] < 0
        if not done:
            assert terms["accuracy"] == 0.0
        steps += 1
    assert terms["accuracy"] == float(info["correct_norm"]) - float(info["reference_correct_norm"])
    assert terms["loglik"] == pytest.approx(info["loglik_delta"])  # terminal step scores no prompt tokens
    assert terms["latency_model"] == pytest.approx(-info["kv_bytes"] / info["fp16_kv_bytes"])
    env.close()


def test_measured_latency_term_makes_the_spec_nondeterministic(tiny_model):
    import gymnasium as gym

    import envs

    model, tok = tiny_model
    env = gym.make(envs.ENV_ID, lm=model, tokenizer=tok, items=ITEMS, **{**TINY_CONFIG, "rewards": {"latency": 1.0}})
    assert env.spec.nondeterministic is True
    env.close()
    env = gym.make(envs.ENV_ID, lm=model, tokenizer=tok, items=ITEMS, **{**TINY_CONFIG, "rewards": {"latency_model": 1.0}})
    assert env.spec.nondeterministic is False
    env.close()


PREFER_LOW = "test_prefer_low_bits"


def test_custom_term_trains_with_ppo_and_unregisters(tiny_model):
    """The documented extension path: one class, registered by name, chosen from the config, trained against."""
    from stable_baselines3 import PPO

    @register_reward(PREFER_LOW)
    class PreferLowBits(RewardTerm):
        """Fewer bits is better (a toy objective for the test)."""

        def __call__(self, step: StepView) -> float:
            return -step.record.bits / step.record.max_bits

    try:
        env = make_env(tiny_model, rewards={PREFER_LOW: 1.0, "memory": 0.0})
        env.reset(seed=0)
        _, reward, *_, info = env.step(0)
        assert info["rewards"][PREFER_LOW] == pytest.approx(-2 / 16) and reward == pytest.approx(-2 / 16)
        model = PPO("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu", verbose=0)
        model.learn(total_timesteps=32)
        assert model.num_timesteps == 32
        action, _ = model.predict(env.reset(seed=1)[0], deterministic=True)
        assert env.action_space.contains(int(action))
        env.close()
    finally:
        REWARDS.unregister(PREFER_LOW)
    assert PREFER_LOW not in REWARDS
    with pytest.raises(KeyError, match="known"):
        make_env(tiny_model, rewards={PREFER_LOW: 1.0})


def _latency_table(path, costs: dict[str, float]) -> str:
    """A latency table as experiments.bench_latency writes it (only the fields the term reads)."""
    import json

    from envs.latency import TABLE_KIND

    path.write_text(json.dumps({"kind": TABLE_KIND, "label": "test-device",
                                "settings": {k: {"relative_decode_cost": v} for k, v in costs.items()}}))
    return str(path)


def test_latency_table_charges_the_committed_setting_measured_cost(tiny_model, tmp_path):
    costs = {"2": 1.25, "4": 1.0625, "8": 1.5, "16": 1.125}
    table = _latency_table(tmp_path / "cpu-test.json", costs)
    spec = {"latency_table": {"weight": 2.0, "table": table}}
    assert RewardFunction(spec).platform_dependent and RewardFunction(spec).deterministic
    env = make_env(tiny_model, rewards=spec)
    env.reset(seed=3)
    done, steps = False, 0
    while not done:
        action = steps % len(env.bits)
        _, reward, done, _, info = env.step(action)
        assert info["rewards"]["latency_table"] == -costs[str(env.bits[action])]
        assert reward == pytest.approx(2.0 * info["rewards"]["latency_table"])
        steps += 1
    env.close()


def test_latency_table_errors_name_the_file_and_the_missing_setting(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="bench_latency"):
        RewardFunction({"latency_table": {"table": str(tmp_path / "missing.json")}})
    (tmp_path / "bad.json").write_text('{"settings": {}}')
    with pytest.raises(ValueError, match="not a latency table"):
        RewardFunction({"latency_table": {"table": str(tmp_path / "bad.json")}})
    table = _latency_table(tmp_path / "partial.json", {"4": 1.0})
    env = make_env(tiny_model, rewards={"latency_table": {"table": table}})
    env.reset(seed=0)
    with pytest.raises(KeyError, match=r"no setting '2'.*partial\.json|partial\.json.*no setting '2'"):
        env.step(env.bits.index(2))
    env.close()


def test_setting_keys():
    from envs.latency import setting_key

    assert [setting_key(4), setting_key((4, 4)), setting_key([4, 2]), setting_key((4, 2), 4),
            setting_key(16, 4), setting_key(3, 0)] == ["4", "4", "k4v2", "k4v2+s4", "16", "3"]
    with pytest.raises(ValueError):
        setting_key((5, 2))


def test_latency_table_reads_pairs_sinks_and_layer_groups(tiny_model, tmp_path):
    costs = {"2+s4": 1.25, "k4v2+s4": 1.125, "16": 1.0}
    table = _latency_table(tmp_path / "cpu-pairs.json", costs)
    env = make_env(tiny_model, bits=[2, [4, 2], 16], sink_tokens=4, layer_groups=2,
                   rewards={"latency_table": {"table": table}})
    env.reset(seed=0)
    _, _, _, _, info = env.step([1, 2])  # group 0 at K4V2, group 1 at fp16; sinks: the first 4 tokens
    assert info["rewards"]["latency_table"] == pytest.approx(-(1.125 + 1.0) / 2)
    _, _, _, _, info = env.step([0, 0])
    assert info["rewards"]["latency_table"] == pytest.approx(-1.25)
    env.close()


def test_prompt_loglik_tokens_in_a_real_episode(tiny_model):
    """All the prompt's tokens give the untruncated term step by step; the last few count only in the steps
    whose block holds them (the last prompt block), never at the terminal step."""
    specs = {"all": {"prompt_loglik": 1.0}, "wide": {"prompt_loglik": {"weight": 1.0, "tokens": 10**6}},
             "tail": {"prompt_loglik": {"weight": 1.0, "tokens": 3}}}
    rewards = {}
    for name, spec in specs.items():
        env = make_env(tiny_model, rewards=spec)
        env.reset(options={"row": ITEMS[2].row})
        done, rewards[name] = False, []
        while not done:
            _, reward, done, _, _ = env.step(0)
            rewards[name].append(reward)
        env.close()
    assert rewards["wide"] == pytest.approx(rewards["all"]) and len(rewards["all"]) > 2
    scoring = [i for i, r in enumerate(rewards["all"]) if r != 0.0]  # steps whose block had tokens to predict
    tail = [i for i, r in enumerate(rewards["tail"]) if r != 0.0]
    assert tail and set(tail) <= set(scoring[-2:])  # 3 tokens lie in the last one or two such blocks
    assert rewards["tail"][-1] == 0.0
