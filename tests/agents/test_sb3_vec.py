"""SB3 trains on the batched vector env through the SB3VecEnv adapter (tiny model)."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "envs"))
from _tiny_env import ITEMS, TINY_CONFIG  # noqa: E402

import envs  # noqa: E402
from agents.sb3_vec import SB3VecEnv, row_infos  # noqa: E402


def _vec(tiny_model, **kw):
    model, tok = tiny_model
    return gym.make_vec(envs.ENV_ID, num_envs=2, vectorization_mode="vector_entry_point",
                        lm=model, tokenizer=tok, items=ITEMS, **TINY_CONFIG, **kw)


def test_row_infos_follows_the_masks():
    infos = {"a": np.array([1, 0]), "_a": np.array([True, False]), "d": {"x": np.array([1.0, 2.0]),
             "_x": np.array([True, True])}, "_d": np.array([True, True])}
    assert row_infos(infos, 2) == [{"a": 1, "d": {"x": 1.0}}, {"d": {"x": 2.0}}]


def test_refuses_next_step_mode(tiny_model):
    with pytest.raises(ValueError, match="SAME_STEP"):
        SB3VecEnv(_vec(tiny_model))


def test_ppo_learns_a_few_dozen_steps(tiny_model):
    from stable_baselines3 import PPO

    venv = SB3VecEnv(_vec(tiny_model, autoreset_mode="same_step"))
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (2, *venv.observation_space.shape)
    dones_seen = 0
    for _ in range(12):
        obs, rewards, dones, infos = venv.step(np.zeros(2, dtype=np.int64))
        for i in np.nonzero(dones)[0]:
            dones_seen += 1
            assert "terminal_observation" in infos[i] and "loglik_delta" in infos[i]
    assert dones_seen > 0
    model = PPO("MlpPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0)
    model.learn(total_timesteps=32)
    assert model.num_timesteps >= 32
    venv.close()
