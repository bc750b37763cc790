"""Reward terms get what they declare: quantities registered outside the package, computed lazily, once."""

from __future__ import annotations

import pytest
import torch
from _tiny_env import expected_inputs, make_env

from envs.quantities import QUANTITIES, StepView, register_quantity
from envs.rewards import REWARDS, RewardTerm, register_reward
from quant.kv_cache import MixedPrecisionKVCache


@pytest.fixture
def registered():
    """Register throwaway quantities/terms for one test: ``registered(QUANTITIES, name)``; removed afterwards."""
    names: list[tuple] = []
    yield lambda registry, name: names.append((registry, name))
    for registry, name in names:
        registry.unregister(name)


def mean_target_prob(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean probability of the actual next token, over the positions that have one."""
    mask = targets >= 0
    log_probs = torch.log_softmax(logits[mask].double(), -1)
    return float(log_probs.gather(-1, targets[mask].unsqueeze(-1)).exp().mean())


def test_term_with_a_new_quantity_and_per_episode_state(tiny_model, registered):
    """Outside the package: a provider for a quantity no built-in term uses, and a term that keeps
    the episode's block-0 value at reset and rewards the change from it at every step."""

    @register_quantity("test_target_prob", needs={"next_block"})
    def test_target_prob(step: StepView) -> float:
        block = step["next_block"]
        return float("nan") if block is None else mean_target_prob(block.logits, block.targets)

    registered(QUANTITIES, "test_target_prob")

    @register_reward("test_target_prob_gain")
    class TargetProbGain(RewardTerm):
        needs = frozenset({"test_target_prob"})

        def reset(self, step: StepView) -> None:
            assert step.record is None
            self.baseline = step["test_target_prob"]

        def __call__(self, step: StepView) -> float:
            return 0.0 if step.record.terminal else step["test_target_prob"] - self.baseline

    registered(REWARDS, "test_target_prob_gain")

    env = make_env(tiny_model, rewards={"test_target_prob_gain": 1.0})
    row = env.items[0].row
    env.reset(options={"row": row})
    actions, got, done = [0, 1, 0, 2, 1, 3], [], False
    while not done:
        _, reward, done, _, info = env.step(actions[len(got)])
        got.append(info["rewards"]["test_target_prob_gain"])
        assert reward == got[-1]

    # by hand: the same prompt through a cache committed at the same bits, block by block
    ids, _ = expected_inputs(env, row)
    cache = MixedPrecisionKVCache(config=env.model.config, group_size=env.config.group_size)
    interval, expected = env.config.interval, []
    for index, start in enumerate(range(0, len(ids), interval)):
        if index:
            cache.commit(env.bits[actions[index - 1]])
        end = min(start + interval, len(ids))
        logits = env._forward(torch.tensor([ids[start:end]]), cache, False).logits[0]
        targets = torch.tensor(ids[start + 1 : end + 1] + [-1] * (end + 1 - len(ids)))
        expected.append(mean_target_prob(logits, targets))
    assert len(got) == len(expected)  # one step per block: the last one commits and scores the endings
    assert got == pytest.approx([e - expected[0] for e in expected[1:]] + [0.0])
    assert any(g != 0.0 for g in got[:-1])  # the check is not vacuous on this prompt
    env.close()


def test_a_quantity_is_computed_once_per_step_and_only_when_asked(tiny_model, registered, monkeypatch):
    calls = []

    @register_quantity("test_counted", needs={"cache"})
    def test_counted(step: StepView) -> int:
        calls.append(step["cache"].committed_length)
        return calls[-1]

    registered(QUANTITIES, "test_counted")
    for name in ("test_reads_a", "test_reads_b"):
        register_reward(name)(
            type(
                name,
                (RewardTerm,),
                {
                    "needs": frozenset({"test_counted"}),
                    "__call__": lambda self, step: float(step["test_counted"]),
                },
            )
        )
        registered(REWARDS, name)

    env = make_env(tiny_model, rewards={"test_reads_a": 1.0, "test_reads_b": 1.0})
    env.reset(seed=0)
    _, reward, *_, info = env.step(0)
    assert calls == [16] and info["rewards"] == {"test_reads_a": 16.0, "test_reads_b": 16.0}

    loglik_calls = []
    provider = QUANTITIES.get("logprob_delta")
    monkeypatch.setattr(provider, "fn", lambda step, fn=provider.fn: loglik_calls.append(1) or fn(step))
    env = make_env(tiny_model, rewards={"memory": 1.0, "test_reads_a": 1.0})
    env.reset(seed=0)
    env.step(0)
    assert loglik_calls == [] and len(calls) == 2  # no term needs the log-likelihood: never computed
    env = make_env(tiny_model, rewards={"loglik": 1.0})
    env.reset(seed=0)
    env.step(0)
    assert loglik_calls == [1]


def test_attention_maps_are_requested_only_when_a_term_needs_them(tiny_model, registered):
    seen = {}

    for name, need in (("test_attn", "attentions"), ("test_block", "next_block")):

        def call(self, step, need=need):
            seen[need] = step[need]
            return 0.0

        register_reward(name)(type(name, (RewardTerm,), {"needs": frozenset({need}), "__call__": call}))
        registered(REWARDS, name)

    env = make_env(tiny_model, rewards={"test_block": 1.0}, features=("entropy",))
    assert "attentions" not in env.forward_needs
    env.reset(seed=0)
    env.step(0)
    assert seen["next_block"].attentions is None

    env = make_env(tiny_model, rewards={"test_attn": 1.0}, features=("entropy",))
    assert "attentions" in env.forward_needs
    env.reset(seed=0)
    env.step(0)
    config = env.model.config
    assert len(seen["attentions"]) == config.num_hidden_layers
    assert seen["attentions"][0].shape[:3] == (1, config.num_attention_heads, env.config.interval)


def test_unknown_need_fails_at_construction_naming_known_quantities(tiny_model, registered):
    register_reward("test_needs_typo")(type("T", (RewardTerm,), {"needs": frozenset({"logprob_delt"})}))
    registered(REWARDS, "test_needs_typo")
    with pytest.raises(
        ValueError,
        match="reward term 'test_needs_typo' needs unknown quantity 'logprob_delt'; "
        "known: .*logprob_delta.*next_block",
    ):
        make_env(tiny_model, rewards={"test_needs_typo": 1.0})


def test_reading_an_undeclared_quantity_is_an_error(tiny_model, registered):
    register_reward("test_sneaky")(
        type("T", (RewardTerm,), {"__call__": lambda self, step: step["logprob_delta"]})
    )
    registered(REWARDS, "test_sneaky")
    env = make_env(tiny_model, rewards={"test_sneaky": 1.0})
    env.reset(seed=0)
    with pytest.raises(
        KeyError, match="reward term 'test_sneaky' reads 'logprob_delta' without declaring it"
    ):
        env.step(0)
