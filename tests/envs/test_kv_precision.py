"""KVPrecision-v0 end to end on the tiny model: API checkers, seeding, scoring, memory, bad input.

One ``@pytest.mark.integration`` test compares a 16-bit episode on the embedded model with the
full-precision evaluator.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from _tiny_env import ITEMS, TINY_CONFIG, expected_inputs, make_env

import envs
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from envs.scoring import choose, score_requests


@pytest.fixture(scope="module")
def env(tiny_model):
    e = make_env(tiny_model)
    yield e
    e.close()


def gym_kwargs(tiny_model, **overrides):
    model, tok = tiny_model
    return dict(lm=model, tokenizer=tok, items=ITEMS, **{**TINY_CONFIG, **overrides})


def run_episode(env, actions, seed=None, options=None):
    obs, info = env.reset(seed=seed, options=options)
    trace = [("reset", obs, None, info)]
    done, t = False, 0
    while not done:
        obs, reward, done, truncated, info = env.step(actions[t % len(actions)])
        assert not truncated
        trace.append((t, obs, reward, info))
        t += 1
    return trace


# --- API ------------------------------------------------------------------------------------------
def test_gymnasium_and_sb3_checkers_pass(env):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_gym_make_registered_id(tiny_model):
    assert envs.ENV_ID == "kvgym/KVPrecision-v0" and envs.ENV_ID in gym.registry
    e = gym.make(envs.ENV_ID, **gym_kwargs(tiny_model))
    assert isinstance(e.unwrapped, KVPrecisionEnv)
    assert e.unwrapped.bits == (2, 4, 8, 16) and e.action_space == gym.spaces.Discrete(4)
    obs, info = e.reset(seed=0)
    assert obs.dtype == np.float32 and e.observation_space.contains(obs)
    assert info["shots"] == 1 and info["blocks"] == math.ceil(info["prompt_tokens"] / 16)
    obs, reward, terminated, truncated, info = e.step(np.int64(2))
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
    assert info["bits"] == 8 and info["tokens"] == 16 and set(info["rewards"]) == {"loglik", "memory"}
    assert e.unwrapped.timings["forward_ms"] > 0
    e.close()


def test_same_seed_same_trajectory(tiny_model):
    a, b = make_env(tiny_model), make_env(tiny_model)
    actions = [0, 3, 1, 2, 2]
    for seed in (3, 7):
        ta, tb = run_episode(a, actions, seed=seed), run_episode(b, actions, seed=seed)
        assert len(ta) == len(tb)
        for (_, oa, ra, ia), (_, ob, rb, ib) in zip(ta, tb, strict=True):
            np.testing.assert_array_equal(oa, ob)
            assert ra == rb and ia == ib
    # the seed does pick the item: several seeds do not all land on one row
    rows = {a.reset(seed=s)[1]["row"] for s in range(8)}
    assert len(rows) > 1
    a.close(), b.close()


# --- vector envs ----------------------------------------------------------------------------------
def test_gymnasium_sync_vector_env(tiny_model):
    venv = gym.make_vec(envs.ENV_ID, num_envs=2, vectorization_mode="sync", **gym_kwargs(tiny_model))
    obs, infos = venv.reset(seed=0)
    assert obs.shape == (2, 11) and obs.dtype == np.float32
    finished = np.zeros(2, dtype=bool)
    for _ in range(40):
        obs, rewards, terminated, truncated, infos = venv.step(np.array([0, 3]))
        assert rewards.shape == (2,) and np.all(np.isfinite(rewards)) and not truncated.any()
        finished |= terminated
        if finished.all():
            break
    assert finished.all()
    venv.close()


@pytest.mark.filterwarnings("ignore:.*render_mode='rgb_array'")  # SB3 tries it first, then falls back
def test_sb3_make_vec_env(tiny_model):
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(envs.ENV_ID, n_envs=2, seed=0, env_kwargs=gym_kwargs(tiny_model))
    obs = venv.reset()
    assert obs.shape == (2, 11)
    for _ in range(40):
        obs, rewards, dones, infos = venv.step(np.array([1, 2]))
        if dones.any():
            break
    assert dones.any()
    i = int(np.flatnonzero(dones)[0])
    assert "correct_norm" in infos[i] and "terminal_observation" in infos[i]
    venv.close()


# --- one whole episode ------------------------------------------------------------------------------
def test_full_precision_episode_matches_fp16_evaluator(env):
    """Every action = 16 bits: ending scores and predictions are the uncached evaluator's."""
    from experiments.eval_fp16 import evaluate_fp16

    for item in env.pool[:3]:
        row = item.row
        prompt, endings = expected_inputs(env, row)
        *_, (_, _, _, info) = run_episode(env, [env.bits.index(16)], options={"row": row})
        fp16 = score_requests(env.model, [(prompt, e) for e in endings])
        assert info["scores"] == pytest.approx(fp16, abs=1e-3)
        assert (info["pred"], info["pred_norm"]) == choose(fp16, item.endings)
        assert info["gold"] == item.label
        assert info["correct"] == (info["pred"] == item.label)
        assert info["correct_norm"] == (info["pred_norm"] == item.label) == info["reference_correct_norm"]
        assert abs(info["loglik_delta"]) < 1e-3 and info["avg_bits"] == 16.0
        assert info["kv_bytes"] == info["fp16_kv_bytes"]
        # the experiments' fp16 evaluator (same pool, seed and shots) agrees on the item
        (rec,) = evaluate_fp16(env.model, env.tokenizer, [item], env.pool, shots=1, seed=env.config.split_seed,
                               progress=False)["records"]
        assert rec["scores"] == pytest.approx(fp16, abs=1e-4) and rec["prompt_tokens"] == len(prompt)
        assert (rec["pred"], rec["pred_norm"]) == (info["pred"], info["pred_norm"])


def test_two_bit_episode_memory_matches_the_storage_formula(env):
    row = env.pool[1].row
    prompt, _ = expected_inputs(env, row)
    *_, (_, _, _, info) = run_episode(env, [env.bits.index(2)], options={"row": row})
    cfg = env.model.config
    layers, heads, dim, group = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, env.config.group_size
    blocks = [min(16, len(prompt) - s) for s in range(0, len(prompt), 16)]

    def block_bytes(t: int) -> int:
        codes = heads * t * dim * 2 // 8  # 2-bit codes, four to a byte, keys and values each
        key_params = heads * dim * math.ceil(t / group) * 2 * 2  # fp16 scale + zero per channel per token group
        value_params = heads * t * math.ceil(dim / group) * 2 * 2  # per token per channel group
        return layers * (2 * codes + key_params + value_params)

    fp16 = layers * 2 * heads * len(prompt) * dim * 2
    assert info["fp16_kv_bytes"] == fp16
    assert info["kv_bytes"] == sum(block_bytes(t) for t in blocks)
    assert info["kv_bytes"] / info["fp16_kv_bytes"] == pytest.approx((2 / 8 + 4 / 16) / 2, abs=0.03)
    assert info["avg_bits"] == 2.0 and info["loglik_delta"] != 0.0


# --- lifecycle and bad input ------------------------------------------------------------------------
def test_close_twice_and_step_after_close(tiny_model):
    e = make_env(tiny_model)
    e.reset(seed=0)
    e.close()
    e.close()
    with pytest.raises(RuntimeError, match="closed"):
        e.step(0)
    with pytest.raises(RuntimeError, match="closed"):
        e.reset(seed=0)


def test_step_before_reset_and_after_termination(tiny_model):
    e = make_env(tiny_model)
    with pytest.raises(RuntimeError, match="before reset"):
        e.step(0)
    run_episode(e, [3], seed=0)
    with pytest.raises(RuntimeError, match="terminated"):
        e.step(0)
    e.reset(seed=0)  # a reset starts over
    e.step(0)
    e.close()


@pytest.mark.parametrize("action", [4, -1, 1.5, "2", None, np.array([0, 1])])
def test_action_outside_the_space(env, action):
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(action)
    env.step(np.int32(3))  # the episode is still usable


def test_long_prompts_drop_earliest_shots(tiny_model):
    tok = tiny_model[1]
    e = make_env(tiny_model, shots=3)
    row = e.pool[0].row
    full = e.reset(options={"row": row})[1]
    assert full["shots"] == 3
    limit = full["prompt_tokens"] - 10  # three shots no longer fit, two do (each shot is > 10 tokens)
    short = make_env(tiny_model, shots=3, max_prompt_tokens=limit)
    info = short.reset(options={"row": row})[1]
    assert info["shots"] == 2 and info["prompt_tokens"] < full["prompt_tokens"]
    # the kept shots are the last two sampled: the earliest one was dropped
    one = make_env(tiny_model, shots=3)
    item, prompt_ids, _ = one.episode_inputs(row)
    from envs.hellaswag import build_prompt, sample_shots

    shots = sample_shots(one.pool, 3, np.random.default_rng([0, row]), exclude_row=row)
    want = tok.encode(build_prompt(item, shots[1:]))
    assert short.episode_inputs(row)[1] == want and len(prompt_ids) == full["prompt_tokens"]
    run_episode(short, [1], options={"row": row})
    with pytest.raises(ValueError, match="even with no shots"):
        make_env(tiny_model, shots=3, max_prompt_tokens=12).reset(options={"row": row})
    for x in (e, short, one):
        x.close()


def test_config_from_yaml_and_unknown_keys(tiny_model, tmp_path):
    good = tmp_path / "env.yaml"
    good.write_text("shots: 0\ninterval: 8\nbits: [2, 8]\nrewards: {loglik: 1.0, budget: {weight: 2, target_bits: 4}}\n")
    cfg = EnvConfig.from_yaml(good)
    assert cfg.shots == 0 and cfg.bits == (2, 8) and cfg.rewards["budget"]["target_bits"] == 4
    model, tok = tiny_model
    e = KVPrecisionEnv(good, lm=model, tokenizer=tok, items=ITEMS, model="tiny-random-llama", eval_size=2)
    assert e.bits == (2, 8) and e.action_space.n == 2 and e.config.interval == 8
    e.close()
    bad = tmp_path / "bad.yaml"
    bad.write_text("shots: 1\nintervall: 64\n")
    with pytest.raises(ValueError, match=r"unknown env config key\(s\) \['intervall'\]; known: .*interval"):
        EnvConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="unknown env config key"):
        make_env(tiny_model, shotz=2)
    for bad_value in (dict(interval=0), dict(shots=-1), dict(split="test"), dict(bits=(3, 5))):
        with pytest.raises(ValueError):
            make_env(tiny_model, **bad_value)
    with pytest.raises(TypeError, match="cannot render"):
        make_env(tiny_model, render_mode="human")
    with pytest.raises(ValueError, match="both lm"):
        KVPrecisionEnv(lm=model, items=ITEMS, **TINY_CONFIG)


def test_unknown_reward_name_in_env_lists_known(tiny_model):
    with pytest.raises(KeyError, match="unknown reward term 'memroy'; known: .*latency_model.*memory"):
        make_env(tiny_model, rewards={"loglik": 1.0, "memroy": 1.0})


# --- cache backends ------------------------------------------------------------------------------------
def test_quanto_cache_episode_is_the_library_baseline_on_the_same_blocks(env):
    """cache=quanto: every block runs through transformers' QuantizedCache, and each ending is scored
    from the prefix exactly as a fresh cache prefilled with the same blocks would score it."""
    from envs.cache_kwarg import with_cache
    from envs.scoring import continuation_logprobs
    from quant.baselines import quanto_cache

    quanto = env.sibling(cache="quanto", bits=(4,))
    assert quanto.action_space == gym.spaces.Discrete(1) and quanto.model is env.model
    row = env.pool[0].row
    *_, (_, _, _, info) = run_episode(quanto, [0], options={"row": row})
    prompt, endings = expected_inputs(env, row)
    expected = []
    for ending in endings:  # the oracle: a new cache per ending, no snapshots
        cache = quanto_cache(env.model, 4, q_group_size=env.config.group_size)
        with torch.no_grad():
            for start in range(0, len(prompt), env.config.interval):
                ids = torch.tensor([prompt[start : start + env.config.interval]])
                out = env.model(input_ids=ids, **with_cache(env.model, cache))
        expected += continuation_logprobs(env.model, prompt, [ending], cache=cache, prefix_last_logits=out.logits[0, -1])
    assert info["scores"] == expected
    assert info["loglik_delta"] == expected[info["gold"]] - env.reference_for(row).ending_scores[info["gold"]]
    assert 4 < info["avg_bits"] <= 16 and info["kv_bytes"] > 0  # short prompt: mostly the float residual window
    *_, (_, _, _, mixed) = run_episode(env, [env.bits.index(4)], options={"row": row})
    assert mixed["fp16_kv_bytes"] == info["fp16_kv_bytes"]  # the same tokens, counted the same way
    quanto.close()


def test_dynamic_cache_episode_is_full_precision(env):
    dynamic = env.sibling(cache="dynamic", bits=(16,))
    row = env.pool[1].row
    *_, (_, _, _, info) = run_episode(dynamic, [0], options={"row": row})
    assert abs(info["loglik_delta"]) < 1e-4 and info["avg_bits"] == 16.0
    assert info["kv_bytes"] == 2 * info["fp16_kv_bytes"]  # the tiny model runs in float32
    dynamic.close()


def test_cache_option_rejects_what_it_cannot_honour(tiny_model):
    with pytest.raises(ValueError, match="nbits"):
        make_env(tiny_model, cache="quanto")  # the default menu (2, 4, 8, 16): quanto's bits are fixed
    with pytest.raises(ValueError, match="does not divide"):
        make_env(tiny_model, cache="quanto", bits=(4,), group_size=48)
    with pytest.raises(ValueError, match="mixed-precision"):
        make_env(tiny_model, cache="quanto", bits=(4,), features=("entropy", "kv_error"))
    with pytest.raises(ValueError, match="cache must be one of"):
        make_env(tiny_model, cache="hqq", bits=(4,))


# --- the real model -----------------------------------------------------------------------------------
@pytest.mark.integration
def test_embedded_fp16_episode_matches_evaluator(embedded_model):
    """5 shots, blocks of 64, every block kept at 16 bits: the fp16 evaluator's scores and choices."""
    from experiments.eval_fp16 import evaluate_fp16

    model, tok = embedded_model
    e = KVPrecisionEnv(lm=model, tokenizer=tok, model="embedded", split="eval", shots=5, interval=64)
    item = e.items[0]
    *_, (_, _, _, info) = run_episode(e, [e.bits.index(16)], options={"row": item.row})
    (rec,) = evaluate_fp16(model, tok, [item], e.pool, shots=5, seed=e.config.split_seed, progress=False)["records"]
    assert rec["prompt_tokens"] > 5 * 64  # several blocks
    assert info["scores"] == pytest.approx(rec["scores"], abs=1e-2)
    assert (info["pred"], info["pred_norm"]) == (rec["pred"], rec["pred_norm"])
    assert info["correct_norm"] == rec["correct_norm"] == info["reference_correct_norm"]
    assert abs(info["loglik_delta"]) < 1e-2
    e.close()


def test_bfloat16_model_runs_whole_episodes():
    """The study runs the model in bf16 (its own dtype): the cache must quantize and restore bf16 keys
    and values, and 16 bits must stay the full-precision reference."""
    env = KVPrecisionEnv(items=ITEMS, **{**TINY_CONFIG, "dtype": "bfloat16"})
    try:
        assert next(env.model.parameters()).dtype == torch.bfloat16
        row = env.pool[0].row
        *_, (_, obs16, _, full) = run_episode(env, [env.bits.index(16)], options={"row": row})
        *_, (_, obs2, _, low) = run_episode(env, [env.bits.index(2)], options={"row": row})
        assert abs(full["loglik_delta"]) < 0.05 and full["avg_bits"] == 16.0
        assert low["avg_bits"] == 2.0 and low["kv_bytes"] < 0.3 * low["fp16_kv_bytes"]  # codes + fp16 scales
        assert np.isfinite(obs2).all() and np.isfinite(low["scores"]).all()
        assert low["scores"] != full["scores"]  # 2-bit codes really changed what the model saw
    finally:
        env.close()


def test_a_rows_inputs_are_tokenized_once_and_handed_out_as_copies(tiny_model, monkeypatch):
    """Resetting the same row again reuses its token ids (no second tokenization), and a caller that edits
    what it got cannot change what the next reset of that row runs."""
    env = make_env(tiny_model)
    calls = []
    tokenize = env._tokenize
    monkeypatch.setattr(env, "_tokenize", lambda item, shots: calls.append(item.row) or tokenize(item, shots))
    row = env.pool[0].row
    _, prompt, endings = env.episode_inputs(row)
    prompt.append(-1)
    endings[0].clear()
    env.reset(options={"row": row})
    assert calls == [row]
    assert env._episode.prompt_ids == env.episode_inputs(row)[1] and -1 not in env._episode.prompt_ids
    assert all(env._episode.endings)
