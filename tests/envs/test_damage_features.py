"""The features that look for damage (recv_attn, attn_kv_error, sink, blocks_left): hand-built inputs
with known answers, and the same numbers out of the env on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_env import make_env

from envs.features import DEFAULT_FEATURES, BlockContext, EpisodeState, FeatureSet

NEW = ("recv_attn", "attn_kv_error", "sink", "blocks_left")


def _state(block_index=0, n_blocks=4, block_start=0, sink_tokens=0) -> EpisodeState:
    return EpisodeState(block_index, n_blocks, 16.0, 1.0, 16, block_start=block_start, sink_tokens=sink_tokens)


def _ctx(tokens: int, attentions=None, cache=None, **state) -> BlockContext:
    return BlockContext(
        token_ids=torch.arange(tokens), logits=torch.zeros(tokens, 5), targets=torch.full((tokens,), -1),
        state=_state(**state), attentions=attentions, cache=cache,
    )


def _map(rows: list[list[float]], keys: int) -> torch.Tensor:
    """[1, 1, T, keys] attention of T queries, each row padded with zeros to ``keys``."""
    out = torch.zeros(1, 1, len(rows), keys)
    for i, r in enumerate(rows):
        out[0, 0, i, : len(r)] = torch.tensor(r)
    return out


# 2 keys of history, then a block of 3 tokens: query i sees 2 + i + 1 keys; the block's keys are columns 2-4
MAP = _map([[0.2, 0.3, 0.5], [0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.2, 0.3, 0.3]], keys=5)
# token 0 (column 2) gets 0.4 from query 1 (4 keys) and 0.2 from query 2 (5 keys): (1.6 + 1.0) / 2
# token 1 (column 3) gets 0.3 from query 2 (5 keys): 1.5; token 2 has no later query
RECEIVED = [1.3, 1.5]


def test_received_attention_of_a_known_map():
    ctx = _ctx(3, attentions=(MAP,))
    np.testing.assert_allclose(ctx.received_attention.numpy(), RECEIVED, rtol=1e-6)
    obs = FeatureSet(["recv_attn"]).observe(ctx)
    assert obs == pytest.approx([1.4, 1.5])


def test_received_attention_averages_heads_and_layers_and_ignores_the_diagonal():
    uniform = _map([[1 / 3] * 3, [1 / 4] * 4, [1 / 5] * 5], keys=5)  # every query spreads evenly: 1 each
    diagonal = _map([[0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0, 1]], keys=5)  # attends only to itself: 0
    two_heads = torch.cat([MAP, uniform], dim=1)
    ctx = _ctx(3, attentions=(two_heads, torch.cat([diagonal, diagonal], dim=1)))
    expected = (np.array(RECEIVED) + 1.0 + 0.0 + 0.0) / 4
    np.testing.assert_allclose(ctx.received_attention.numpy(), expected, rtol=1e-6)


def test_received_attention_of_a_one_token_block_is_empty_and_summarises_to_zero():
    ctx = _ctx(1, attentions=(_map([[0.5, 0.5]], keys=2),))
    assert ctx.received_attention.numel() == 0
    assert FeatureSet(["recv_attn"]).observe(ctx) == [0.0, 0.0]


def test_received_attention_needs_maps_that_hold_the_block():
    with pytest.raises(RuntimeError, match="attention maps"):
        FeatureSet(["recv_attn"]).observe(_ctx(3))
    with pytest.raises(ValueError, match="cannot hold"):
        FeatureSet(["recv_attn"]).observe(_ctx(3, attentions=(MAP[..., :2],)))


class _Pending:
    """Stands in for the cache: a known per-token 2-bit error of the pending block."""

    def __init__(self, error: list[float]):
        self.error = torch.tensor(error)
        self.asked: list = []

    def pending_error(self, bits):
        self.asked.append(bits)
        return self.error


def test_attn_kv_error_weights_each_tokens_error_by_its_received_attention():
    cache = _Pending([0.5, 2.0, 9.0])  # the last token's error has no received attention: left out
    obs = FeatureSet(["attn_kv_error"]).observe(_ctx(3, attentions=(MAP,), cache=cache))
    assert obs == pytest.approx([(0.5 * 1.3 + 2.0 * 1.5) / 2, 2.0 * 1.5])
    assert cache.asked == [2]
    with pytest.raises(RuntimeError, match="cache"):
        FeatureSet(["attn_kv_error"]).observe(_ctx(3, attentions=(MAP,)))


@pytest.mark.parametrize(
    ("block_start", "tokens", "sinks", "share"),
    [(0, 16, 4, 0.25), (0, 3, 4, 1.0), (2, 4, 4, 0.5), (4, 16, 4, 0.0), (32, 16, 4, 0.0), (0, 16, 0, 0.0)],
)
def test_sink_share_before_and_after_the_sink_tokens(block_start, tokens, sinks, share):
    ctx = _ctx(tokens, block_start=block_start, sink_tokens=sinks)
    assert FeatureSet(["sink"]).observe(ctx) == [pytest.approx(share)]


@pytest.mark.parametrize(("index", "blocks", "left"), [(0, 4, 0.75), (3, 4, 0.0), (0, 1, 0.0), (1, 5, 0.6)])
def test_blocks_left_counts_from_the_end(index, blocks, left):
    assert FeatureSet(["blocks_left"]).observe(_ctx(2, block_index=index, n_blocks=blocks)) == [pytest.approx(left)]


def test_default_features_are_unchanged():
    assert not set(NEW) & set(DEFAULT_FEATURES)


def test_env_observes_the_new_features_as_a_direct_computation(tiny_model):
    """Block 0 runs on an empty cache: its received attention is a plain forward's; the sink share
    and blocks_left follow the block positions; the env passes gymnasium's and SB3's checkers."""
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    model, _ = tiny_model
    env = make_env(tiny_model, features=(*DEFAULT_FEATURES, *NEW), sink_tokens=20)
    names = env.observation_names
    assert names[-6:] == ("recv_attn_mean", "recv_attn_max", "attn_kv_error_mean", "attn_kv_error_max",
                          "sink", "blocks_left")
    obs, info = env.reset(options={"row": env.pool[0].row})
    n, interval = info["blocks"], env.config.interval
    assert n >= 3
    ids = env._episode.prompt_ids[:interval]
    with torch.inference_mode():
        maps = model(input_ids=torch.tensor([ids]), use_cache=False, output_attentions=True).attentions
    a = torch.stack([m[0].double() for m in maps]).mean(dim=(0, 1))  # [T, T] over layers and heads
    t = len(ids)
    recv = [sum(float(a[i, j]) * (i + 1) for i in range(j + 1, t)) / (t - 1 - j) for j in range(t - 1)]
    get = dict(zip(names, obs, strict=True))
    assert get["recv_attn_mean"] == pytest.approx(np.mean(recv), rel=1e-4)
    assert get["recv_attn_max"] == pytest.approx(np.max(recv), rel=1e-4)
    error = env._episode.cache.pending_error(2)[: t - 1].double().numpy()
    assert get["attn_kv_error_mean"] == pytest.approx(np.mean(error * recv), rel=1e-4)
    seen = [get]
    done = False
    while not done:
        obs, _, done, _, _ = env.step(0)
        if not done:
            seen.append(dict(zip(names, obs, strict=True)))
    assert [s["sink"] for s in seen[:3]] == pytest.approx([1.0, 4 / 16, 0.0])  # 20 sinks over 16-token blocks
    assert [s["blocks_left"] for s in seen] == pytest.approx([(n - 1 - k) / n for k in range(n)])
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)
    env.close()


def test_batched_vector_env_observes_the_same_as_the_single_env(tiny_model):
    """The vector env cuts each row's maps back to its own keys; the block's keys must still be the
    last columns (rows of different lengths: padded slots would shift them)."""
    import gymnasium as gym
    from _tiny_env import ITEMS, TINY_CONFIG, assert_vector_follows_single

    import envs

    model, tok = tiny_model
    kw = dict(TINY_CONFIG, shots=2, features=NEW, sink_tokens=20)
    vec = gym.make_vec(envs.ENV_ID, num_envs=3, vectorization_mode="vector_entry_point",
                       lm=model, tokenizer=tok, items=ITEMS, **kw)
    single = make_env(tiny_model, **kw)
    info = assert_vector_follows_single(vec, single, [100, 103, 105], 1, rtol=1e-3, atol=1e-4)
    assert len(set(info["prompt_tokens"].tolist())) > 1  # rows of different lengths
    vec.close()
    single.close()


def test_generation_observes_the_new_features_as_a_teacher_forced_block(tmp_path):
    """Controller-driven generation (eight 1-token decode steps per block, maps padded per step)
    gives block 1 the recv_attn, sink and blocks_left that one forward over its tokens gives."""
    import math

    from agents.registry import make_policy
    from envs.cache_kwarg import with_cache
    from envs.features import RunningFrequency
    from envs.kv_precision import EnvConfig
    from envs.model import load_model
    from experiments import generate
    from quant.kv_cache import MixedPrecisionKVCache

    features = ("recv_attn", "sink", "blocks_left", "progress")
    # generation's cache keeps no fp16 sinks (generate does not read env.sink_tokens), so sink reads 0
    env_cfg = EnvConfig(model="tiny-random-llama", interval=8, features=features)
    cfg = generate.GenerateConfig(env=env_cfg, policy="fixed:16", prompts=("Explain quantization briefly.",),
                                  max_new_tokens=20, min_new_tokens=20, threads=1, out_dir=str(tmp_path),
                                  progress=False)
    model, tok = load_model("tiny-random-llama")
    fs = FeatureSet(features)
    policy = make_policy("fixed:16", fs.observation_names, env_cfg.bits)
    rec = generate.generate_one(model, tok, policy, cfg.prompts[0], cfg)
    ids = generate.encode_prompt(tok, cfg.prompts[0])[0]
    seq = torch.cat([ids, torch.tensor(rec["token_ids"])])
    p, n_blocks = len(ids) - 1, math.ceil((len(ids) + 20) / 8)
    cache = MixedPrecisionKVCache(config=model.config)
    freq = RunningFrequency()
    for k, (lo, hi) in enumerate([(0, p), (p, p + 8)]):
        with torch.inference_mode():
            out = model(input_ids=seq[lo:hi][None], **with_cache(model, cache), use_cache=True, output_attentions=True)
        state = EpisodeState(k, n_blocks, 16.0, 1.0, 16, block_start=lo)
        ctx = BlockContext(seq[lo:hi], out.logits[0], seq[lo + 1 : hi + 1], state, freq, out.attentions)
        got = list(rec["decisions"][k]["obs"].values())
        np.testing.assert_allclose(got, fs.observe(ctx), rtol=1e-3, atol=1e-5, err_msg=f"block {k}")
        cache.commit(16)
