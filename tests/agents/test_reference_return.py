"""ReferenceReturnWrapper: the return minus a reference policy's return on the same episode (tiny random Llama)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from agents import make_policy
from agents.reference_return import ReferenceReturnWrapper
from agents.rollout import rollout
from envs import ENV_ID
from envs.kv_precision import EnvConfig

TINY = EnvConfig(model="tiny-random-llama", shots=0, interval=16, bits=(2, 4, 8, 16), episodes="train-0-3",
                 rewards={"loglik": {"weight": 1.0}})



@pytest.fixture(scope="module")
def env():
    env = gym.make(ENV_ID, config=TINY)
    yield env
    env.close()


def test_playing_the_reference_earns_exactly_zero_and_departures_earn_their_difference(env):
    wrapped = ReferenceReturnWrapper(env, make_policy("fixed:4", env=env))
    rows = set()
    for seed in range(4):
        same = rollout(wrapped, make_policy("fixed:4", env=env), seed=seed)
        row = same.reset_info["row"]
        rows.add(row)
        assert same.total_reward == 0.0
        assert same.final_info["reference_return"] == wrapped.reference_returns[row]
        lower = rollout(wrapped, make_policy("fixed:2", env=env), options={"row": row})
        alone = rollout(env, make_policy("fixed:2", env=env), options={"row": row}).total_reward
        reference = rollout(env, make_policy("fixed:4", env=env), options={"row": row}).total_reward
        assert lower.total_reward == pytest.approx(alone - reference, abs=1e-9)
        assert lower.total_reward != 0.0
    assert set(wrapped.reference_returns) == rows  # one reference episode per row, kept


def test_masks_reach_the_learner_through_the_wrapper():
    budgeted = gym.make(ENV_ID, config=EnvConfig(**{**TINY.__dict__, "bit_budget": 2.0}))
    try:
        wrapped = ReferenceReturnWrapper(budgeted, make_policy("fixed:2", env=budgeted))
        wrapped.reset(seed=0)
        assert np.array_equal(wrapped.action_masks(), budgeted.unwrapped.action_masks())
        assert wrapped.action_masks().tolist() == [True, False, False, False]  # only 2 bits fits 2.0
    finally:
        budgeted.close()


def test_an_env_without_an_episode_set_is_refused():
    env = gym.make(ENV_ID, config=EnvConfig(model="tiny-random-llama", shots=0, interval=16))
    try:
        with pytest.raises(ValueError, match="episode set"):
            ReferenceReturnWrapper(env, make_policy("fixed:4", env=env))
    finally:
        env.close()
