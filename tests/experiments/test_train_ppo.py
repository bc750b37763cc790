"""train_ppo with sb3-contrib's MaskablePPO, the reward normaliser and the learning curve, on the tiny random Llama."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import make_policy
from agents.sb3 import known_algorithms, resolve_algorithm
from envs.features import FeatureSet
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments import train_ppo
from experiments.learning_curve import COLUMNS, read_curve

TINY = EnvConfig(model="tiny-random-llama", shots=0, interval=16)  # a few blocks per episode
NAMES = FeatureSet(TINY.features).observation_names
BITS = (2, 4, 8, 16)
FAST = {"n_steps": 16, "batch_size": 8, "n_epochs": 1, "gamma": 1.0, "gae_lambda": 0.95}


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


class _RecordingRun:
    """Stands in for the wandb run: keeps what is logged."""

    def __init__(self):
        self.logged: list[dict] = []
        self.metrics: dict[str, str | None] = {}
        self.summary: dict = {}

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, row):
        self.logged.append(dict(row))

    def finish(self):
        pass


@pytest.fixture
def recorded(monkeypatch):
    run = _RecordingRun()
    monkeypatch.setattr(train_ppo.tracking, "init_run", lambda **kwargs: run)
    return run


@pytest.fixture
def masked_env(monkeypatch):
    """The env's own ``action_masks`` allows settings 0 and 1 only; the actions the env receives are recorded.

    The method is set on the env class (as the budgeted env defines it), so MaskablePPO must find it behind
    gym.make's and Monitor's wrappers, the way the script's envs expose it.
    """
    taken: list[int] = []
    allowed = np.array([True, True, False, False])
    monkeypatch.setattr(KVPrecisionEnv, "action_masks", lambda self: allowed.copy(), raising=False)
    real_step = KVPrecisionEnv.step

    def recording_step(self, action):
        taken.append(int(action))
        return real_step(self, action)

    monkeypatch.setattr(KVPrecisionEnv, "step", recording_step)
    return taken


def test_resolve_algorithm_knows_sb3_contrib():
    assert resolve_algorithm("MaskablePPO") is MaskablePPO and resolve_algorithm("maskableppo") is MaskablePPO
    assert resolve_algorithm("PPO") is PPO  # stable-baselines3's own classes are unchanged
    assert {"PPO", "A2C", "DQN", "MaskablePPO", "RecurrentPPO"} <= set(known_algorithms())
    with pytest.raises(ValueError, match=r"known: \[.*'MaskablePPO'"):
        resolve_algorithm("NOPE")


def test_maskable_ppo_acts_within_env_masks_and_logs_its_learning_curve(tmp_path, masked_env, recorded):
    cfg = train_ppo.TrainPPOConfig(env=TINY, algo="MaskablePPO", algo_kwargs=FAST, total_timesteps=128,
                                   checkpoint_every=64, eval_freq=64, eval_episodes=1, threads=1,
                                   out_dir=str(tmp_path), progress=False)
    paths = train_ppo.run(cfg)
    assert masked_env and set(masked_env) <= {0, 1}  # sampled within the masks: never 8 or 16 bits
    assert paths["model"].name == "maskableppo.zip"
    assert (tmp_path / "checkpoints" / "maskableppo_vecnormalize_64_steps.pkl").is_file()
    policy = make_policy(f"sb3:MaskablePPO:{paths['model']}", NAMES, BITS)
    assert isinstance(policy.model, MaskablePPO) and policy.model.num_timesteps == 128

    with open(paths["learning_curve"]) as f:
        assert f.readline().strip().split(",") == list(COLUMNS)
    rows = read_curve(paths["learning_curve"])
    assert [r["timesteps"] for r in rows] == list(range(16, 129, 16))  # one row per rollout of n_steps
    assert all(math.isfinite(r["explained_variance"]) and r["value_loss"] >= 0 for r in rows)
    finished = [r for r in rows if r["episodes"] > 0]
    assert finished and sum(r["episodes"] for r in rows) <= 128
    assert all(math.isfinite(r["episode_return"]) and math.isfinite(r["damage"]) for r in finished)
    assert all(2 <= r["avg_bits"] <= 16 for r in finished)
    assert all(r["budget_enforced_rate"] == 0.0 for r in rows)  # no bit_budget: the env never pushes back

    # the same curve in the wandb run, plotted against env steps
    assert recorded.metrics["curve/*"] == "curve/timesteps"
    curve = [row for row in recorded.logged if "curve/timesteps" in row]
    assert [row["curve/timesteps"] for row in curve] == list(range(16, 129, 16))
    assert all("curve/explained_variance" in row for row in curve)
    assert [row["curve/explained_variance"] for row in curve] == pytest.approx([r["explained_variance"] for r in rows])


def test_learning_curve_counts_budget_enforcement(tmp_path, monkeypatch):
    """``budget_enforced`` in info (the budgeted env's flag) becomes the curve's per-step rate."""

    def make(config):
        env = train_ppo.gym.make(train_ppo.ENV_ID, config=config)
        step = env.step

        def flagged_step(action):
            obs, reward, terminated, truncated, info = step(action)
            return obs, reward, terminated, truncated, {**info, "budget_enforced": int(action) == 3}

        env.step = flagged_step
        return env

    monkeypatch.setattr(train_ppo, "make_env", make)
    cfg = train_ppo.TrainPPOConfig(env=TINY, algo_kwargs=FAST, total_timesteps=32, checkpoint_every=0, threads=1,
                                   out_dir=str(tmp_path), progress=False)
    rates = [r["budget_enforced_rate"] for r in read_curve(train_ppo.run(cfg)["learning_curve"])]
    assert len(rates) == 2 and all(0 <= r <= 1 for r in rates) and 0 < sum(rates)  # a random policy picks 16 bits


def test_resume_continues_the_curve_and_the_reward_normaliser(tmp_path, capsys):
    kwargs = dict(env=TINY, algo_kwargs=FAST, checkpoint_every=32, threads=1, out_dir=str(tmp_path), progress=False)
    first = train_ppo.run(train_ppo.TrainPPOConfig(total_timesteps=48, **kwargs))
    assert [r["timesteps"] for r in read_curve(first["learning_curve"])] == [16, 32, 48]
    stats = train_ppo.vecnormalize_path(train_ppo.checkpoints(first["checkpoints"])[-1])
    assert stats.name == "ppo_vecnormalize_32_steps.pkl" and stats.is_file()

    # resumes from the 32-step checkpoint: the row at 48 (written after it) is dropped and written again
    second = train_ppo.run(train_ppo.TrainPPOConfig(total_timesteps=64, resume=True, **kwargs))
    out = capsys.readouterr().out
    assert "resuming from" in out and "start afresh" not in out
    assert [r["timesteps"] for r in read_curve(second["learning_curve"])] == [16, 32, 48, 64]

    with pytest.raises(ValueError, match="normalize_reward"):
        train_ppo.run(train_ppo.TrainPPOConfig(total_timesteps=80, resume=True, normalize_reward=False, **kwargs))
    # starting over clears the checkpoints, their statistics and the curve
    third = train_ppo.run(train_ppo.TrainPPOConfig(total_timesteps=16, normalize_reward=False, **kwargs))
    assert not list(third["checkpoints"].iterdir())
    assert [r["timesteps"] for r in read_curve(third["learning_curve"])] == [16]


def test_maskable_ppo_refuses_an_env_without_masks():
    venv = DummyVecEnv([lambda: gym.make("CartPole-v1")])
    with pytest.raises(ValueError, match="action_masks"):
        train_ppo._check_masks(MaskablePPO, venv)
    train_ppo._check_masks(PPO, venv)  # plain PPO needs no masks


def test_warm_start_imitates_the_teacher_before_ppo(tmp_path, recorded):
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, bit_budget=6.0)
    cfg = train_ppo.TrainPPOConfig(env=env, algo="MaskablePPO", algo_kwargs={**FAST, "learning_rate": 1e-5},
                                   total_timesteps=16, checkpoint_every=0, threads=1, warm_start="fixed:4",
                                   warm_start_episodes=3, warm_start_epochs=40, out_dir=str(tmp_path), progress=False)
    paths = train_ppo.run(cfg)
    assert recorded.summary["warm_start_agreement"] == 1.0 and recorded.summary["warm_start_steps"] > 3
    obs, actions, masks = train_ppo.teacher_data(cfg)
    assert set(actions.tolist()) == {BITS.index(4)} and masks.shape == (len(actions), len(BITS))
    model = MaskablePPO.load(paths["model"], device="cpu")
    assert (model.predict(obs, deterministic=True, action_masks=masks)[0] == actions).all()  # a tiny PPO step after it


def test_warm_start_refuses_bad_teachers_early(tmp_path):
    kwargs = dict(env=TINY, algo_kwargs=FAST, total_timesteps=16, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="warm_start_episodes"):
        train_ppo.run(train_ppo.TrainPPOConfig(warm_start="fixed:4", warm_start_episodes=0, **kwargs))
    with pytest.raises(ValueError, match="plans per item"):
        train_ppo.run(train_ppo.TrainPPOConfig(warm_start="oracle", warm_start_episodes=1, **kwargs))


def test_reference_policy_pays_the_gain_over_it(tmp_path, recorded):
    """A learner that can only play the reference's setting earns exactly 0 on every episode's return."""
    env = EnvConfig(model="tiny-random-llama", shots=0, interval=16, bits=(4,), episodes="train-0-3")
    cfg = train_ppo.TrainPPOConfig(env=env, algo_kwargs=FAST, total_timesteps=32, checkpoint_every=0, threads=1,
                                   reference_policy="fixed:4", out_dir=str(tmp_path), progress=False)
    rows = read_curve(train_ppo.run(cfg)["learning_curve"])
    assert any(r["episodes"] for r in rows)
    assert all(r["episode_return"] == 0.0 for r in rows if r["episodes"])
    with pytest.raises(ValueError):
        train_ppo.run(train_ppo.TrainPPOConfig(env=env, reference_policy="nonsense:x", total_timesteps=16,
                                               out_dir=str(tmp_path / "bad"), progress=False))
