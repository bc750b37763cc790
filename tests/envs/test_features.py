"""Every observation entry against a direct computation on the tiny model.

Block 0 runs against an empty cache, so its features must match a plain forward exactly; later
blocks run against committed 16-bit (fp16) keys/values, so they match a full-precision forward of
the same tokens up to fp16 rounding.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from _tiny_env import ITEMS, TINY_CONFIG, expected_inputs, make_env

import envs
from envs.features import (
    DEFAULT_FEATURES,
    FEATURES,
    BlockContext,
    EpisodeState,
    Feature,
    FeatureSet,
    LogitStats,
    RunningFrequency,
    head_variance,
    register_feature,
)

ROW = ITEMS[0].row  # split="train" draws from the pool; rows are picked explicitly below


@pytest.fixture(scope="module")
def env(tiny_model):
    e = make_env(tiny_model)
    yield e
    e.close()


def _pool_row(env) -> int:
    return env.pool[0].row


def _full_forward(model, ids: list[int]):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False, output_attentions=True)


def _hand_features(model, prompt: list[int], start: int, end: int) -> dict[str, float]:
    """The default token features of block [start, end) computed from scratch."""
    out = _full_forward(model, prompt[:end])
    logits = out.logits[0, start:end].double()
    probs = torch.softmax(logits, -1)
    entropy = -(probs * probs.log()).sum(-1)
    # rarity: -log(count of the token so far / tokens so far), counting from the episode's first token
    rarity = []
    for i in range(start, end):
        rarity.append(-math.log(prompt[: i + 1].count(prompt[i]) / (i + 1)))
    # attention variance: var over heads, summed over keys, mean over layers
    per_layer = []
    for att in out.attentions:
        a = att[0, :, start:end, :end].double()  # [heads, T, S]
        mean = a.mean(0, keepdim=True)
        per_layer.append(((a - mean) ** 2).mean(0).sum(-1))
    attn_var = torch.stack(per_layer).mean(0)
    # token accuracy: probability of the real next token (the prompt's last token has none)
    acc = [float(probs[i - start, prompt[i + 1]]) for i in range(start, min(end, len(prompt) - 1))]
    return {
        "entropy_mean": float(entropy.mean()),
        "entropy_max": float(entropy.max()),
        "rarity_mean": float(np.mean(rarity)),
        "rarity_max": float(np.max(rarity)),
        "attn_var_mean": float(attn_var.mean()),
        "token_acc_mean": float(np.mean(acc)),
        "token_acc_min": float(np.min(acc)),
    }


def test_default_observation_names(env):
    assert env.observation_names == (
        "entropy_mean", "entropy_max", "rarity_mean", "rarity_max", "attn_var_mean", "token_acc_mean",
        "token_acc_min", "progress", "avg_bits", "kv_ratio", "last_bits",
    )
    assert env.observation_space.shape == (len(env.observation_names),)
    assert FeatureSet(DEFAULT_FEATURES).observation_names == env.observation_names


def test_token_features_block0_match_direct_computation(env):
    row = _pool_row(env)
    prompt, _ = expected_inputs(env, row)
    obs, info = env.reset(options={"row": row})
    assert info["prompt_tokens"] == len(prompt) and info["blocks"] == math.ceil(len(prompt) / 16)
    got = dict(zip(env.observation_names, obs.tolist(), strict=True))
    want = _hand_features(env.model, prompt, 0, 16)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert 0.0 < got["attn_var_mean"] <= 1.0
    assert 0.0 <= got["token_acc_min"] <= got["token_acc_mean"] <= 1.0


def test_token_features_later_blocks_match_full_forward(env):
    """After 16-bit commits, block k's features are those of one full-precision forward (fp16 rounding aside)."""
    row = _pool_row(env)
    prompt, _ = expected_inputs(env, row)
    env.reset(options={"row": row})
    n_blocks = math.ceil(len(prompt) / 16)
    for k in range(1, n_blocks):
        obs, *_ = env.step(env.bits.index(16))
        got = dict(zip(env.observation_names, obs.tolist(), strict=True))
        want = _hand_features(env.model, prompt, 16 * k, min(16 * (k + 1), len(prompt)))
        for name, value in want.items():
            tol = 1e-6 if name.startswith("rarity") else 2e-3
            assert got[name] == pytest.approx(value, rel=tol, abs=tol), (k, name)
    # the last block's final token has no known next token: token_acc covers one token less
    assert n_blocks >= 3


def test_state_features_after_known_actions(env):
    row = _pool_row(env)
    prompt, _ = expected_inputs(env, row)
    n_blocks = math.ceil(len(prompt) / 16)
    assert n_blocks >= 4
    obs, _ = env.reset(options={"row": row})
    s = dict(zip(env.observation_names, obs.tolist(), strict=True))
    assert [s[k] for k in ("progress", "avg_bits", "kv_ratio", "last_bits")] == pytest.approx([1 / n_blocks, 1, 1, 1])

    def ratio(bits: int) -> float:
        # group 16 = block length = head_dim: per element bits/8 code bytes + fp16 scale+zero per 16 elements,
        # for keys and for values, against 2 bytes per element in fp16
        return 1.0 if bits == 16 else (bits / 8 + 4 / 16) / 2

    committed: list[int] = []
    for step, action in enumerate([0, 1, 2][: n_blocks - 1], start=1):
        obs, *_ = env.step(action)
        committed.append(env.bits[action])
        s = dict(zip(env.observation_names, obs.tolist(), strict=True))
        assert s["progress"] == pytest.approx((step + 1) / n_blocks)
        assert s["avg_bits"] == pytest.approx(np.mean(committed) / 16)  # every committed block has 16 tokens
        assert s["last_bits"] == pytest.approx(committed[-1] / 16)
        assert s["kv_ratio"] == pytest.approx(np.mean([ratio(b) for b in committed]))


def test_state_features_are_bits_over_16_with_a_reduced_bit_menu(tiny_model):
    """avg_bits/last_bits are bits/16 whatever bits the agent may choose (the interface's fixed unit)."""
    env = make_env(tiny_model, bits=(2, 4))
    obs, _ = env.reset(options={"row": _pool_row(env)})
    s = dict(zip(env.observation_names, obs.tolist(), strict=True))
    assert s["avg_bits"] == pytest.approx(1.0) and s["last_bits"] == pytest.approx(1.0)  # nothing committed: fp16
    obs, *_ = env.step(1)  # 4 bits
    s = dict(zip(env.observation_names, obs.tolist(), strict=True))
    assert s["last_bits"] == pytest.approx(4 / 16) and s["avg_bits"] == pytest.approx(4 / 16)
    env.close()


def test_running_frequency_counts_by_hand():
    freq = RunningFrequency()
    assert freq.observe([5, 5, 7]) == pytest.approx([0.0, -math.log(2 / 2), -math.log(1 / 3)])
    assert freq.observe([7, 9]) == pytest.approx([-math.log(2 / 4), -math.log(1 / 5)])


def test_entropy_and_token_acc_on_a_handmade_block():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    ctx = BlockContext(
        token_ids=torch.tensor([1, 2, 3]),
        logits=logits,
        targets=torch.tensor([2, 0, -1]),
        state=EpisodeState(block_index=0, n_blocks=2, avg_bits=16, kv_ratio=1.0, last_bits=16),
    )
    obs = dict(zip(FeatureSet(("entropy", "token_acc", "progress")).observation_names,
                   FeatureSet(("entropy", "token_acc", "progress")).observe(ctx), strict=True))
    p = torch.softmax(logits.double(), -1)
    h = -(p * p.log()).sum(-1)
    assert obs["entropy_mean"] == pytest.approx(float(h.mean()), rel=1e-5)
    assert obs["entropy_max"] == pytest.approx(math.log(4), rel=1e-5)
    assert obs["token_acc_mean"] == pytest.approx((0.25 + float(p[1, 0])) / 2, rel=1e-5)
    assert obs["token_acc_min"] == pytest.approx(0.25, rel=1e-5)
    assert obs["progress"] == pytest.approx(0.5)


def test_blocks_reading_shared_logit_stats_get_their_own():
    """Two blocks' logits stacked in one LogitStats (a batched forward's run of rows): each block, reading its
    slice by offset, gets the entropy, target log-probs and log-probs its own logits give; the observations too."""
    torch.manual_seed(0)
    state = EpisodeState(block_index=0, n_blocks=2, avg_bits=16, kv_ratio=1.0, last_bits=16)
    logits = [torch.randn(3, 7), torch.randn(4, 7)]
    targets = [torch.tensor([1, 5, 2]), torch.tensor([0, 6, 3, -1])]
    shared = LogitStats(torch.cat(logits), torch.cat(targets))
    features = FeatureSet(("entropy", "token_acc"))
    for b, offset in enumerate((0, 3)):
        own = BlockContext(torch.arange(len(targets[b])), logits[b], targets[b], state)
        read = BlockContext(torch.arange(len(targets[b])), logits[b], targets[b], state, logit_stats=(shared, offset))
        for name in ("entropy", "target_log_probs", "log_probs"):
            torch.testing.assert_close(getattr(read, name), getattr(own, name))
        assert read.target_log_probs.shape == (int((targets[b] >= 0).sum()),)
        assert features.observe(read) == pytest.approx(features.observe(own))
    with pytest.raises(ValueError, match="one target per position"):
        LogitStats(torch.zeros(3, 7), torch.zeros(4, dtype=torch.long))


def test_head_variance_of_a_padded_batch_is_each_rows_own():
    """attn_var's statistic over a batch of rows padded to the longest (queries past a row's end, keys it
    cannot see at weight 0) equals each row's own maps'; batch values, when given, are what a block reads."""
    torch.manual_seed(0)
    tokens, seen = [3, 5], [7, 9]
    maps = []
    for _ in range(2):  # layers
        layer = torch.zeros(2, 4, 5, 9)
        for r in range(2):
            layer[r, :, : tokens[r], : seen[r]] = torch.softmax(torch.randn(4, tokens[r], seen[r]), -1)
        maps.append(layer)
    batch = head_variance(maps)
    for r in range(2):
        own = [m[r : r + 1, :, : tokens[r], : seen[r]] for m in maps]
        x = torch.stack([m[0] for m in own])  # [layers, heads, T, S]: the definition, by hand
        by_hand = x.var(dim=1, unbiased=False).sum(-1).mean(0)  # variance over heads, summed over keys
        torch.testing.assert_close(batch[r, : tokens[r]], head_variance(own)[0])
        torch.testing.assert_close(head_variance(own)[0], by_hand, rtol=1e-5, atol=1e-7)
    state = EpisodeState(block_index=0, n_blocks=1, avg_bits=16, kv_ratio=1.0, last_bits=16)
    ctx = BlockContext(token_ids=torch.tensor([1, 2, 3]), logits=torch.zeros(3, 4), targets=torch.tensor([1, 2, -1]),
                       state=state, batch_values={"head_variance": batch[0, :3]})
    assert FeatureSet(("attn_var",)).observe(ctx) == pytest.approx([float(batch[0, :3].mean())])
    with pytest.raises(RuntimeError, match="attention maps"):
        _ = BlockContext(token_ids=ctx.token_ids, logits=ctx.logits, targets=ctx.targets, state=state).head_variance


def test_latency_feature_makes_the_spec_nondeterministic(tiny_model):
    model, tok = tiny_model
    kwargs = dict(lm=model, tokenizer=tok, items=ITEMS, **TINY_CONFIG)
    plain = gym.make(envs.ENV_ID, **kwargs)
    assert plain.spec.nondeterministic is False
    plain.close()
    env = gym.make(envs.ENV_ID, features=("entropy", "latency", "progress"), **kwargs)
    assert env.spec.nondeterministic is True and env.unwrapped.spec.nondeterministic is True
    obs, _ = env.reset(seed=0)
    names = env.unwrapped.observation_names
    assert "latency_mean" in names
    ms = obs[names.index("latency_mean")]
    assert np.isfinite(ms) and ms > 0
    obs, *_ = env.step(0)
    assert obs[names.index("latency_mean")] > 0
    env.close()


def test_kv_error_feature_is_the_cache_pending_error(tiny_model):
    env = make_env(tiny_model, features=("kv_error", "progress"))
    obs, _ = env.reset(options={"row": _pool_row(env)})
    names = env.observation_names
    assert names[:2] == ("kv_error_mean", "kv_error_max")
    for _ in range(2):
        direct = env._episode.cache.pending_error(2)
        np.testing.assert_allclose(obs[:2], [direct.mean().item(), direct.max().item()], rtol=1e-5)
        assert 0 < obs[0] <= obs[1] and env.observation_space.contains(obs)
        obs, _, done, *_ = env.step(0)
        if done:
            break
    env.close()


def test_saliency_feature_gives_finite_positive_values(tiny_model):
    env = make_env(tiny_model, features=("saliency", "entropy", "progress"))
    obs, _ = env.reset(seed=0)
    names = env.observation_names
    for _ in range(2):
        sal = obs[[names.index("saliency_mean"), names.index("saliency_max")]]
        assert np.all(np.isfinite(sal)) and np.all(sal > 0) and sal[0] <= sal[1]
        assert env.observation_space.contains(obs)
        obs, *_ = env.step(1)
    # the backward pass must leave no graph behind in the cache
    assert all(not layer.keys.requires_grad for layer in env._episode.cache.layers)
    env.close()


def test_saliency_matches_autograd_on_block0(tiny_model):
    env = make_env(tiny_model, features=("saliency",))
    row = _pool_row(env)
    prompt, _ = expected_inputs(env, row)
    obs, _ = env.reset(options={"row": row})
    model = env.model
    embeds = model.get_input_embeddings()(torch.tensor([prompt[:16]])).detach().requires_grad_(True)
    with torch.enable_grad():
        lp = torch.log_softmax(model(inputs_embeds=embeds, use_cache=False).logits[0].float(), -1)
        (grad,) = torch.autograd.grad(lp.max(-1).values.sum(), embeds)
    norms = grad[0].norm(dim=-1)
    assert obs.tolist() == pytest.approx([float(norms.mean()), float(norms.max())], rel=1e-4)
    env.close()


def test_custom_feature_extension_and_errors():
    @register_feature("test_block_len")
    class BlockLen(Feature):
        per_token = False
        high = 1e3

        def compute(self, ctx):
            return len(ctx.token_ids)

    try:
        fs = FeatureSet(("test_block_len", "progress"))
        assert fs.observation_names == ("test_block_len", "progress")
        with pytest.raises(ValueError, match="already registered"):
            register_feature("test_block_len")(BlockLen)
    finally:
        FEATURES.unregister("test_block_len")
    assert "test_block_len" not in FEATURES
    with pytest.raises(ValueError, match="already registered"):
        register_feature("entropy")(type("Other", (Feature,), {}))
    with pytest.raises(KeyError, match="known: .*attn_var.*entropy"):
        FeatureSet(("entropy", "entropi"))
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSet(("entropy", "entropy"))


def test_unknown_feature_in_env_config_lists_known(tiny_model):
    with pytest.raises(KeyError, match="unknown feature 'nope'; known: .*entropy"):
        make_env(tiny_model, features=("entropy", "nope"))


def test_observations_stay_in_the_box_with_tiny_blocks(tiny_model):
    """One-token blocks at 8 bits store more than fp16 (a scale and zero per key group): kv_ratio > 1."""
    env = make_env(tiny_model, interval=1)
    obs, _ = env.reset(seed=0)
    ratio = env.observation_names.index("kv_ratio")
    for _ in range(3):
        obs, *_ = env.step(env.bits.index(8))
        assert obs[ratio] > 1.0 and env.observation_space.contains(obs)
    env.close()
