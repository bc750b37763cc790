"""SB3Policy on a tiny stand-in env with the real observation names and Discrete(4) actions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO

from agents import make_policy
from agents.sb3 import SB3Policy, resolve_algorithm

NAMES = (
    "entropy_mean entropy_max rarity_mean rarity_max attn_var_mean token_acc_mean token_acc_min "
    "progress avg_bits kv_ratio last_bits"
).split()
BITS = (2, 4, 8, 16)


class TinyEnv(gym.Env):
    """Random observations; reward for choosing more bits when entropy_mean is high. Episodes of 8 steps."""

    def __init__(self, names=tuple(NAMES), bits=BITS):
        self.observation_names, self.bits = tuple(names), tuple(bits)
        self.observation_space = gym.spaces.Box(0.0, 5.0, shape=(len(names),), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(bits))
        self._t = 0

    def _obs(self):
        return self.np_random.uniform(0, 5, size=len(self.observation_names)).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t, self._last = 0, self._obs()
        return self._last, {}

    def step(self, action):
        reward = -abs(float(action) - self._last[0] * 0.6)
        self._t += 1
        self._last = self._obs()
        return self._last, reward, self._t >= 8, False, {"bits": self.bits[int(action)]}


@pytest.fixture(scope="module")
def ppo_path(tmp_path_factory):
    env = TinyEnv()
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu", verbose=0)
    model.learn(total_timesteps=128)
    path = tmp_path_factory.mktemp("sb3") / "ppo.zip"
    model.save(path)
    return path


def test_load_and_predict(ppo_path):
    env = TinyEnv()
    pol = SB3Policy(ppo_path, env)
    assert pol.name == "ppo" and pol.bits == BITS and pol.observation_names == tuple(NAMES)
    obs, _ = env.reset(seed=0)
    one, state = pol.predict(obs)
    assert np.asarray(one).shape == () and 0 <= int(one) < 4 and state is None
    batch = np.stack([env.observation_space.sample() for _ in range(5)])
    actions, _ = pol.predict(batch)
    assert actions.shape == (5,)
    expected, _ = pol.model.predict(batch, deterministic=True)
    assert (actions == expected).all()  # delegates to the SB3 model
    assert (pol.act(batch) == expected).all()


def test_make_policy_specs(ppo_path):
    env = TinyEnv()
    assert make_policy(f"sb3:{ppo_path}", env=env).name == "ppo"
    assert make_policy(f"sb3:PPO:{ppo_path}", env=env).name == "ppo"
    # without an env the saved spaces are checked against the names and bits
    assert make_policy(f"sb3:{ppo_path}", NAMES, BITS).name == "ppo"
    # a bare archive is recognised as SB3 by its content, whatever its suffix
    renamed = ppo_path.with_name("agent.bin")
    renamed.write_bytes(ppo_path.read_bytes())
    assert make_policy(str(renamed), env=env).name == "ppo"
    # SB3 appends ".zip" when saving; accept the path without it too
    assert SB3Policy(str(ppo_path)[: -len(".zip")], env).name == "ppo"


def test_space_mismatch_is_a_clear_error(ppo_path):
    with pytest.raises(ValueError, match="observation space"):
        SB3Policy(ppo_path, TinyEnv(names=NAMES[:5]))
    with pytest.raises(ValueError, match="action space"):
        SB3Policy(ppo_path, TinyEnv(bits=(4, 8, 16)))
    with pytest.raises(ValueError, match="observation space"):
        make_policy(f"sb3:{ppo_path}", NAMES[:-1], BITS)


def test_file_and_algorithm_errors(ppo_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SB3Policy(tmp_path / "none.zip", TinyEnv())
    with pytest.raises(ValueError, match=r"known: \[.*'PPO'"):
        SB3Policy(ppo_path, TinyEnv(), algo="NOPE")
    assert resolve_algorithm("a2c").__name__ == "A2C"
    with pytest.raises(ValueError, match="could not load"):
        SB3Policy(ppo_path, TinyEnv(), algo="DQN")


def test_maskable_ppo_marks_tokens_on_a_protect_env(tiny_model, tmp_path):
    """On an env with protect_bits the action is the setting then one mark per token slot: MaskablePPO learns on
    it with the env's masks, and SB3Policy acts with its marks (not as 65 layer groups), within the budget."""
    import sys
    from pathlib import Path

    from sb3_contrib import MaskablePPO

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "envs"))
    from _passkey_source import SOURCE

    from agents.rollout import rollout
    from envs.kv_precision import KVPrecisionEnv

    model, tokenizer = tiny_model
    env = KVPrecisionEnv(
        lm=model, tokenizer=tokenizer, items=SOURCE, model="tiny-random-llama", task="passkey", interval=64,
        group_size=32, eval_size=4, split="train", bits=[2, 4], sink_tokens=4, protect_bits=4,
        token_features=["digits"], features=["digits"], task_options={"length": 600, "items": 12, "keys": 1},
        bit_budget=2.5, reference_store=False,
    )
    agent = MaskablePPO("MlpPolicy", env, n_steps=32, batch_size=16, n_epochs=1, seed=0)
    agent.learn(32)
    agent.save(tmp_path / "ppo.zip")
    policy = make_policy(f"sb3:MaskablePPO:{tmp_path / 'ppo.zip'}", env=env)
    assert (policy.protect_slots, policy.layer_groups) == (64, 1)
    episode = rollout(env, policy, options={"row": env.items[0].row})
    assert all(np.shape(a) == (65,) for a in episode.actions)
    assert sum(i["protected_tokens"] for i in episode.infos) > 0  # a random-ish policy marks some tokens
    assert episode.final_info["avg_bits"] <= 2.5


def test_behaviour_clone_fits_a_teacher_and_respects_its_masks():
    from sb3_contrib import MaskablePPO

    from agents.sb3 import behaviour_clone

    env = TinyEnv()
    env.action_masks = lambda: np.ones(len(BITS), dtype=bool)
    model = MaskablePPO("MlpPolicy", env, seed=0, device="cpu", verbose=0)
    rng = np.random.default_rng(0)
    obs = rng.uniform(0, 5, size=(400, len(NAMES))).astype(np.float32)
    teacher = (obs[:, 0] > 2.5).astype(np.int64) * 2  # 2 bits on low entropy, 8 bits on high
    masks = np.ones((400, len(BITS)), dtype=bool)
    masks[:200, 3] = False  # the budget forbade 16 bits on half the steps: the fit is under the masks
    before = (model.policy.predict(obs, deterministic=True)[0] == teacher).mean()
    fit = behaviour_clone(model, obs, teacher, masks, epochs=40)
    assert fit["agreement"] > 0.95 > before
    assert (model.predict(obs, deterministic=True, action_masks=masks)[0] == teacher).mean() > 0.95
    with pytest.raises(ValueError, match="one action"):
        behaviour_clone(model, obs, teacher[:10])
    with pytest.raises(ValueError, match="epochs >= 1"):
        behaviour_clone(model, obs, teacher, epochs=0)
