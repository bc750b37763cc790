"""Every policy kind under a bit budget (tiny model): fixed, rule, MLP, SB3 PPO and MaskablePPO end
within the budget through ``rollout``; a policy that reads the mask falls back itself (the env never
has to), one that cannot is pushed back by the env; the SB3 vector adapter exposes the masks."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "envs"))
from _tiny_env import ITEMS, TINY_CONFIG, make_env  # noqa: E402

import envs  # noqa: E402
from agents import make_policy  # noqa: E402
from agents.fixed import FixedBitsPolicy  # noqa: E402
from agents.rollout import Schedule, rollout  # noqa: E402
from envs.budget import fallback_action  # noqa: E402

BITS = (2, 4, 8, 16)
BUDGET = 3.0
ROWS = 4  # episodes per policy: the pool's first rows


@pytest.fixture(scope="module")
def env(tiny_model):
    e = make_env(tiny_model, bits=BITS, bit_budget=BUDGET)
    yield e
    e.close()


def _episodes(env, policy, n=ROWS):
    return [rollout(env, policy, options={"row": item.row}) for item in env.pool[:n]]


def _assert_within_budget(episodes, *, enforced_by_env: bool | None = False):
    for ep in episodes:
        assert ep.final_info["avg_bits"] <= BUDGET
        if enforced_by_env is not None:
            assert any(i["budget_enforced"] for i in ep.infos) == enforced_by_env


def _assert_budget_binds(policy, episodes):
    """Without the mask the policy would have asked for something else somewhere: the test is not vacuous."""
    asked = [int(policy.predict(o)[0]) for ep in episodes for o in ep.observations]
    assert asked != [a for ep in episodes for a in ep.actions]


@pytest.fixture(scope="module")
def mlp_path(env, tmp_path_factory):
    """A controller fitted for two epochs on rows that mostly ask for 16 bits (so the budget binds)."""
    from agents.mlp import DEFAULT_FEATURES, train_controller

    path = tmp_path_factory.mktemp("mlp") / "rows.csv"
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*DEFAULT_FEATURES, "latency_ms_per_token", "bits"])
        writer.writeheader()
        for i in range(80):
            row = {name: float(rng.uniform(0, 1)) for name in DEFAULT_FEATURES}
            writer.writerow({**row, "latency_ms_per_token": 1.0, "bits": 16 if i % 4 else 8})
    out = path.with_name("controller.pt")
    train_controller(path, out, epochs=2, seed=0, progress=False)
    return out


def _trained(algo, env, folder: Path) -> Path:
    """A tiny SB3 model (``algo``: PPO or MaskablePPO) trained 16 steps on ``env``, saved under ``folder``."""
    model = algo("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu", verbose=0)
    model.learn(total_timesteps=16)
    path = folder / f"{algo.__name__.lower()}.zip"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def ppo_path(env, tmp_path_factory):
    from stable_baselines3 import PPO

    return _trained(PPO, env, tmp_path_factory.mktemp("ppo"))


@pytest.fixture(scope="module")
def maskable_path(env, tmp_path_factory):
    from sb3_contrib import MaskablePPO

    return _trained(MaskablePPO, env, tmp_path_factory.mktemp("maskable"))


def test_fixed_16_falls_back_to_the_dearest_feasible_setting_itself(env):
    episodes = _episodes(env, make_policy("fixed:16", env=env))
    _assert_within_budget(episodes)  # the policy applied the mask: the env never had to
    for ep in episodes:  # what it asked for is what the env committed, and it is not 16 throughout
        assert [env.bits[a] for a in ep.actions] == [i["bits"] for i in ep.infos]
        assert ep.actions[0] != BITS.index(16)


def test_rule_stays_within_budget(env):
    always_16 = make_policy("rule:0.0,0.0,0.0", env=env)  # thresholds 0: 16 bits on every block
    episodes = _episodes(env, always_16)
    _assert_within_budget(episodes)
    _assert_budget_binds(always_16, episodes)
    _assert_within_budget(_episodes(env, make_policy("rule", env=env)))


def test_mlp_stays_within_budget(env, mlp_path):
    policy = make_policy(f"mlp:{mlp_path}", env=env)
    episodes = _episodes(env, policy)
    _assert_within_budget(episodes)
    _assert_budget_binds(policy, episodes)


def test_plain_ppo_falls_back_like_the_env(env, ppo_path):
    policy = make_policy(f"sb3:{ppo_path}", env=env)
    assert not policy.reads_masks
    masked = _episodes(env, policy)
    _assert_within_budget(masked)
    _assert_budget_binds(policy, masked)
    # the same model without the mask (a raw SB3 model in rollout) is pushed back by the env instead
    episodes = _episodes(env, policy.model)
    _assert_within_budget(episodes, enforced_by_env=None)
    assert any(i["budget_enforced"] for ep in episodes for i in ep.infos)
    for raw, fell_back in zip(episodes, masked, strict=True):  # same commits either way
        assert [i["bits"] for i in raw.infos] == [i["bits"] for i in fell_back.infos]


def test_maskable_ppo_reads_the_masks(env, maskable_path, monkeypatch):
    from sb3_contrib import MaskablePPO

    import agents.sb3 as sb3

    monkeypatch.setattr(sb3, "resolve_algorithm", lambda name: MaskablePPO)  # H5 adds it to the registry
    policy = sb3.SB3Policy(maskable_path, env, "MaskablePPO")
    assert policy.reads_masks
    seen = []
    model_predict = policy.model.predict

    def spy(obs, state=None, episode_start=None, deterministic=False, action_masks=None):
        seen.append(action_masks)
        return model_predict(obs, state, episode_start, deterministic, action_masks)

    policy.model.predict = spy
    episodes = _episodes(env, policy)
    _assert_within_budget(episodes)  # the model sampled among the allowed settings: the env never had to push back
    assert len(seen) == sum(len(ep) for ep in episodes) and all(m is not None and m.shape == (4,) for m in seen)
    assert not all(m.all() for m in seen)  # the budget did mask something
    obs, _ = env.reset(options={"row": env.pool[0].row})
    only_cheapest = np.array([True, False, False, False])
    for _ in range(5):  # sampling under a mask never leaves it
        action, _ = policy.predict(obs, deterministic=False, action_masks=only_cheapest)
        assert int(action) == 0


def test_policy_predict_applies_the_fallback_to_a_batch():
    policy = FixedBitsPolicy(["a", "b"], BITS, 16)
    masks = np.array([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    actions, _ = policy.predict(np.zeros((3, 2), dtype=np.float32), action_masks=masks)
    assert actions.tolist() == [1, 3, 0]
    single, _ = policy.predict(np.zeros(2, dtype=np.float32), action_masks=masks[0])
    assert int(single) == fallback_action(BITS, 3, masks[0]) == 1
    unmasked, _ = policy.predict(np.zeros(2, dtype=np.float32))
    assert int(unmasked) == 3


def test_schedule_is_pushed_back_by_the_env(env):
    row = env.pool[0].row
    blocks = env.reset(options={"row": row})[1]["blocks"]
    episode = rollout(env, Schedule([BITS.index(16)] * blocks), options={"row": row})
    _assert_within_budget([episode], enforced_by_env=True)
    assert all(i["requested_setting"] == "16" for i in episode.infos)


def test_no_budget_leaves_every_policy_unchanged(tiny_model):
    free = make_env(tiny_model, bits=BITS)
    episode = rollout(free, make_policy("fixed:16", env=free), options={"row": free.pool[0].row})
    assert all(i["bits"] == 16 and not i["budget_enforced"] for i in episode.infos)


def test_sb3_vec_adapter_exposes_the_masks(tiny_model):
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

    from agents.sb3_vec import SB3VecEnv

    model, tok = tiny_model
    vec = gym.make_vec(
        envs.ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", autoreset_mode="same_step",
        lm=model, tokenizer=tok, items=ITEMS, **{**TINY_CONFIG, "bits": BITS, "bit_budget": BUDGET},
    )
    venv = SB3VecEnv(vec)
    venv.seed(0)
    venv.reset()
    assert is_masking_supported(venv)
    for _ in range(6):
        masks = get_action_masks(venv)
        assert masks.shape == (2, len(BITS)) and np.array_equal(masks, vec.action_masks())
        assert np.array_equal(masks, venv.action_masks())
        venv.step(np.full(2, len(BITS) - 1))
    agent = MaskablePPO("MlpPolicy", venv, n_steps=8, batch_size=16, n_epochs=1, seed=0, device="cpu", verbose=0)
    agent.learn(total_timesteps=16)  # masks flow through sb3-contrib's rollout collection
    venv.close()
