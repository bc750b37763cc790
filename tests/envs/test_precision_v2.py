"""Precision control v2 in the env: (key, value) pairs in the menu, fp16 sink tokens, layer groups.

Tiny models only: the 2-layer tiny Llama, and a 6-layer one for ``layer_groups: 3``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from _tiny_env import make_env, tiny_model_with_layers

from envs.kv_precision import EnvConfig
from envs.settings import normalize_menu, parse_setting, setting_name, settings_by_cost


@pytest.fixture(scope="module")
def six_layers():
    return tiny_model_with_layers(6)


def run(env, action, row=None):
    obs, info = env.reset(seed=0, options=None if row is None else {"row": row})
    infos, done = [], False
    while not done:
        obs, _, done, _, info = env.step(action)
        infos.append(info)
    return infos


# --- settings ---------------------------------------------------------------------------------------
def test_setting_names_round_trip():
    assert normalize_menu([2, [4, 2], 4, [8, 4], 16, [3, 3]]) == (2, (4, 2), 4, (8, 4), 16, 3)
    assert [setting_name(s) for s in (4, [4, 4], (4, 2), 16)] == ["4", "4", "k4v2", "16"]
    assert parse_setting("k4v2") == (4, 2) and parse_setting("K8V8") == 8 and parse_setting("2") == 2
    # cheapest first; at equal mean bits more key bits first (K4V2 before K2V4)
    menu = normalize_menu([16, (2, 4), (4, 2), 2, 4])
    assert [menu[i] for i in settings_by_cost(menu)] == [2, (4, 2), (2, 4), 4, 16]


@pytest.mark.parametrize(
    "bits, fix",
    [([2, [4, 5]], "supported"), ([2, [4, 2, 1]], "exactly 2"), ([4, [4, 4]], "once"), (["k9v2"], "supported"),
     ([], "at least one")],
)
def test_bad_menus_are_clear_errors(bits, fix):
    with pytest.raises(ValueError, match=fix):
        EnvConfig(bits=tuple(bits)).validate()


def test_config_reads_yaml_pairs():
    cfg = EnvConfig.from_dict({"bits": [2, [4, 2], 4, [8, 4], 16], "sink_tokens": 4, "layer_groups": 2})
    assert cfg.bits == (2, (4, 2), 4, (8, 4), 16)
    cfg.validate()


# --- checkers ----------------------------------------------------------------------------------------
def _check(env):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_checkers_pass_with_pairs_and_sinks(tiny_model):
    env = make_env(tiny_model, bits=(2, (4, 2), 4, (8, 4), 16), sink_tokens=4)
    assert env.bits == (2, (4, 2), 4, (8, 4), 16) and env.action_space == gym.spaces.Discrete(5)
    _check(env)
    env.close()


def test_checkers_pass_with_layer_groups(tiny_model, six_layers):
    env = make_env(tiny_model, bits=(2, (4, 2), 8), layer_groups=2)
    assert env.action_space == gym.spaces.MultiDiscrete([3, 3])
    _check(env)
    env.close()
    env = make_env(six_layers, bits=(2, (4, 2), 16), layer_groups=3, sink_tokens=2)
    assert env.action_space == gym.spaces.MultiDiscrete([3, 3, 3])
    _check(env)
    env.close()


# --- info and average bits -----------------------------------------------------------------------------
def test_k4v2_episode_is_three_bits_and_info_has_key_value_bits(tiny_model):
    env = make_env(tiny_model, bits=(2, (4, 2), 4))
    infos = run(env, 1, row=100)
    assert all(i["bits"] == (4, 2) and i["setting"] == "k4v2" for i in infos)
    assert all(i["key_bits"] == [4] and i["value_bits"] == [2] for i in infos)
    assert infos[-1]["avg_bits"] == 3
    k4v4 = run(env, 2, row=100)[-1]
    k2v2 = run(env, 0, row=100)[-1]
    assert k2v2["kv_bytes"] < infos[-1]["kv_bytes"] < k4v4["kv_bytes"]
    assert k4v4["avg_bits"] == 4 and k4v4["bits"] == 4 and k4v4["setting"] == "4"
    env.close()


def test_sink_tokens_count_sixteen_bits(tiny_model):
    plain = make_env(tiny_model, bits=((4, 2),))
    sinks = make_env(tiny_model, bits=((4, 2),), sink_tokens=4)
    base, sunk = run(plain, 0, row=100)[-1], run(sinks, 0, row=100)[-1]
    assert sunk["fp16_kv_bytes"] == base["fp16_kv_bytes"]  # same prompt, same tokens
    committed = plain.unwrapped._episode.cache.committed_length
    assert sunk["avg_bits"] == pytest.approx((3 * (committed - 4) + 16 * 4) / committed)
    assert sunk["avg_bits"] > base["avg_bits"] == 3 and sunk["kv_bytes"] > base["kv_bytes"]
    plain.close()
    sinks.close()


def test_layer_groups_commit_one_setting_per_group(six_layers):
    env = make_env(six_layers, bits=(2, (4, 2), 8), layer_groups=3)
    infos = run(env, np.array([2, 1, 0]), row=100)
    assert infos[0]["bits"] == [8, (4, 2), 2] and infos[0]["setting"] == ["8", "k4v2", "2"]
    assert infos[0]["key_bits"] == [8, 4, 2] and infos[0]["value_bits"] == [8, 2, 2]
    assert infos[-1]["avg_bits"] == pytest.approx((8 + 3 + 2) / 3)
    cache = env.unwrapped._episode.cache
    assert [s.key_bits for s in cache.layers[1].segments] == [8] and cache.layers[2].segments[0].value_bits == 2
    assert cache.layers[4].segments[0].key_bits == 2
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(np.array([0, 3, 0]))
    with pytest.raises(ValueError, match="3 integers"):
        env.step(1)
    env.close()


def test_uniform_layer_groups_equal_one_group(six_layers):
    one = make_env(six_layers, bits=(2, (4, 2), 8))
    three = make_env(six_layers, bits=(2, (4, 2), 8), layer_groups=3)
    a, b = run(one, 1, row=101)[-1], run(three, [1, 1, 1], row=101)[-1]
    assert a["scores"] == b["scores"] and a["kv_bytes"] == b["kv_bytes"] and a["avg_bits"] == b["avg_bits"]
    one.close()
    three.close()


# --- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, fix",
    [
        (dict(layer_groups=3), r"larger than the model's 2 layers.*\[1, 2\]"),
        (dict(layer_groups=0), "layer_groups must be >= 1"),
        (dict(sink_tokens=-1), "sink_tokens must be >= 0"),
        (dict(bits=(2, (4, 6))), "supported"),
        (dict(cache="quanto", bits=(4,), sink_tokens=4), "sink_tokens=0"),
        (dict(cache="quanto", bits=((4, 2),)), "cache='mixed'"),
        (dict(cache="dynamic", bits=(16,), layer_groups=2), "layer_groups=1"),
    ],
)
def test_bad_settings_are_clear_errors(tiny_model, overrides, fix):
    with pytest.raises(ValueError, match=fix):
        make_env(tiny_model, **overrides)


def test_layer_groups_must_divide_the_layers(six_layers):
    with pytest.raises(ValueError, match=r"does not divide the model's 6 layers.*\[1, 2, 3, 6\]"):
        make_env(six_layers, layer_groups=4)


# --- learning -------------------------------------------------------------------------------------------
def test_ppo_trains_with_layer_groups_and_acts_through_the_policy_spec(six_layers, tmp_path):
    from stable_baselines3 import PPO

    from agents.registry import make_policy
    from agents.rollout import rollout

    features = ("entropy", "progress", "avg_bits", "last_bits")  # no attention outputs: fast steps
    env = make_env(six_layers, bits=(2, (4, 2), 8), layer_groups=3, features=features)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=200)
    assert model.num_timesteps >= 200
    model.save(tmp_path / "ppo.zip")
    policy = make_policy(f"sb3:{tmp_path / 'ppo.zip'}", env=env)
    assert policy.layer_groups == 3
    episode = rollout(env, policy, options={"row": 100})
    assert all(len(a) == 3 and env.action_space.contains(np.asarray(a)) for a in episode.actions)
    assert episode.infos[0]["setting"] == [setting_name(env.bits[i]) for i in episode.actions[0]]
    batch, _ = policy.predict(np.stack([episode.observations[0]] * 2))
    assert batch.shape == (2, 3)
    env.close()
