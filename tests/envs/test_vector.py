"""The batched vector env (envs.vector) against the single env, on the tiny model.

Equality: at all-16 the same episodes give the same gold scores (1e-3 nats) and predictions; at
quantized settings the paired mean difference of the gold log-lik delta has a 95% CI containing 0.
Then NEXT_STEP autoreset, vector-env sanity (spaces, dtypes, seeding) and the refusals.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from _tiny_env import ITEMS, TINY_CONFIG, assert_vector_follows_single, make_env

import envs
import envs.batched_forward
import envs.vector
from envs.batched_forward import forward_rows
from envs.features import head_variance
from envs.kv_precision import KVPrecisionEnv
from envs.scoring import batched_continuation_logprobs
from envs.vector import KVPrecisionVectorEnv
from experiments.stats import paired_diff_ci
from quant.batched_cache import BatchedKVCache
from quant.kv_cache import MixedPrecisionKVCache


def make_vec(tiny_model, num_envs=3, **overrides) -> KVPrecisionVectorEnv:
    model, tok = tiny_model
    vec = gym.make_vec(
        envs.ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point",
        lm=model, tokenizer=tok, items=ITEMS, **{**TINY_CONFIG, **overrides},
    )
    assert isinstance(vec, KVPrecisionVectorEnv)
    return vec


def first_episodes(vec, action: int, seed=None, options=None) -> list[dict]:
    """Step every row with ``action`` until each has ended once; each row's terminal info (and obs trace)."""
    obs, info = vec.reset(seed=seed, options=options)
    traces = [[obs[i]] for i in range(vec.num_envs)]
    ends: list[dict | None] = [None] * vec.num_envs
    while any(e is None for e in ends):
        obs, reward, term, trunc, info = vec.step(np.full(vec.num_envs, action))
        for i in range(vec.num_envs):
            if ends[i] is not None:
                continue
            traces[i].append(obs[i])
            if term[i]:
                if info.get("_final_info", np.zeros(vec.num_envs, bool))[i]:  # SAME_STEP: the row restarted
                    traces[i][-1] = info["final_obs"][i]
                    info = info["final_info"]
                ends[i] = {k: info[k][i] for k in ("scores", "pred", "pred_norm", "loglik_delta", "row")}
                ends[i]["reward"] = float(reward[i])
                ends[i]["obs"] = traces[i]
    return ends


def single_episode(env, action: int, seed=None, options=None) -> dict:
    obs, _ = env.reset(seed=seed, options=options)
    trace = [obs]
    while True:
        obs, reward, term, _, info = env.step(action)
        trace.append(obs)
        if term:
            return {**info, "reward": float(reward), "obs": trace}


# --- the cache -------------------------------------------------------------------------------------
def test_batched_cache_mask_and_positions():
    rows = [MixedPrecisionKVCache(2), MixedPrecisionKVCache(2)]
    k = torch.randn(1, 1, 3, 4)
    for layer in rows[0].layers:
        layer.update(k, k)  # row 0 has seen 3 tokens, row 1 none
    cache = BatchedKVCache(rows, [2, 1])
    assert cache.past == [3, 0] and cache.width == 5
    assert cache.position_ids(2).tolist() == [[3, 4], [0, 1]]
    allowed = cache.attention_mask(2, torch.float32)[:, 0] == 0
    assert allowed[0].tolist() == [[True] * 4 + [False], [True] * 5]
    assert allowed[1].tolist() == [[True] + [False] * 4, [True] + [False] * 4]  # query 1 is padding
    keys, _ = cache.layers[0].update(torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4))
    assert keys.shape == (2, 1, 5, 4) and rows[1].layers[0].get_seq_length() == 1
    assert torch.equal(keys[0, :, :3], k[0]) and keys[1, :, 1:].abs().sum() == 0


def test_batched_cache_layout_of_new_tokens():
    """Per-row positions and visibility among the new tokens (continuations packed side by side)."""
    rows = [MixedPrecisionKVCache(1), MixedPrecisionKVCache(1)]
    for layer in rows[0].layers:
        layer.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))  # row 0 has seen 2 tokens
    cache = BatchedKVCache(rows, [3, 2])
    offsets = torch.tensor([[0, 1, 0], [0, 0, 0]])  # row 0: a continuation of two tokens, then one of one
    assert cache.position_ids(3, offsets=offsets).tolist() == [[2, 3, 2], [0, 0, 0]]
    visible = torch.zeros(2, 3, 3, dtype=torch.bool)
    visible[0] = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    visible[1, :2, :2] = torch.eye(2, dtype=torch.bool)
    allowed = cache.attention_mask(3, torch.float32, visible=visible)[:, 0] == 0
    assert allowed[0].tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                   [True, True, False, False, True]]
    assert allowed[1].tolist() == [[True, False, False, False, False], [False, True, False, False, False],
                                   [True, False, False, False, False]]  # query 2 is padding
    default = cache.attention_mask(3, torch.float32)
    causal = torch.ones(3, 3, dtype=torch.bool).tril().expand(2, -1, -1)
    assert torch.equal(default, cache.attention_mask(3, torch.float32, visible=causal))
    with pytest.raises(ValueError, match="visible"):
        cache.attention_mask(3, torch.float32, visible=visible[:1])


def test_rows_keep_their_floats_in_the_vector_envs_store(tiny_model):
    """The batched env's rows read and write one shared buffer (quant.batched_cache.RowKVStore), so the
    equality tests below cover that path; a new episode takes its row over."""
    vec = make_vec(tiny_model, num_envs=3)
    vec.reset(seed=0)
    first = [env._episode.cache for env in vec.envs]
    vec.step(np.zeros(3, dtype=np.int64))
    for i, env in enumerate(vec.envs):
        for index, layer in enumerate(env._episode.cache.layers):
            assert vec.store.holds(index, i, layer._kept[0])
    for _ in range(40):  # until every row has started a second episode
        vec.step(np.zeros(3, dtype=np.int64))
        if all(env._episode.cache is not cache for env, cache in zip(vec.envs, first, strict=True)):
            break
    assert all(layer.kept_slot is None for cache in first for layer in cache.layers)  # detached


# --- equality with the single env ----------------------------------------------------------------------
@pytest.mark.parametrize("by_row", [True, False])
def test_attention_features_equal_the_single_envs(tiny_model, monkeypatch, by_row):
    """attn_var from one head-variance pass per group of rows attended together (every row alone on a CPU,
    ``by_row``; the whole batch elsewhere), recv_attn from each row's maps cut when it reads them: the
    single env's observations either way."""
    monkeypatch.setattr(envs.batched_forward, "ATTEND_BY_ROW", by_row)
    rows_per_call = []

    def counted(maps):
        rows_per_call.append(maps[0].shape[0])
        return head_variance(maps)

    monkeypatch.setattr(envs.vector, "head_variance", counted)
    features = ["attn_var", "recv_attn", "entropy"]
    vec, single = make_vec(tiny_model, num_envs=2, features=features), make_env(tiny_model, features=features)
    full = single.bits.index(16)
    rows = [100, 103]
    for end, row in zip(first_episodes(vec, full, options={"rows": rows}), rows, strict=True):
        ref = single_episode(single, full, options={"row": row})
        np.testing.assert_allclose(np.stack(end["obs"]), np.stack(ref["obs"]), atol=1e-4)
    assert (2 in rows_per_call) != by_row  # both rows' statistic in one pass, unless attended row by row
    assert rows_per_call



@pytest.mark.parametrize(
    "batch_scoring,mode",
    [(False, "next_step"), (True, "next_step"), (True, "same_step")],
    ids=["rows-score-alone", "endings-in-the-block-forward", "endings-in-one-forward-first"],
)
def test_all16_equals_single_env(tiny_model, batch_scoring, mode, monkeypatch):
    """Scores as the single env's whichever way the endings are scored: row by row; with batch_scoring, in
    the step's block forward (NEXT_STEP), or in one forward of their own before it (SAME_STEP, where a
    restarted row's next episode joins the block forward)."""
    vec = make_vec(tiny_model, num_envs=4, batch_scoring=batch_scoring, autoreset_mode=mode)
    single = make_env(tiny_model)
    assert vec.batch_scoring is batch_scoring
    batched_rows = []  # rows per batched scoring forward of its own
    shared = []  # per block forward: (rows scoring endings, rows running a block)

    def counted(model, caches, *args):
        batched_rows.append(len(caches))
        return batched_continuation_logprobs(model, caches, *args)

    def forward(model, caches, rows, *args, **kwargs):
        if kwargs.get("output_attentions") is not None:  # the step's forward (not the batched scoring's)
            packed = sum(row.visible is not None for row in rows)
            shared.append((packed, len(rows) - packed))
        return forward_rows(model, caches, rows, *args, **kwargs)

    monkeypatch.setattr(envs.vector, "batched_continuation_logprobs", counted)
    monkeypatch.setattr(envs.vector, "forward_rows", forward)
    full = single.bits.index(16)
    rows = [100, 103, 105, 108]
    lengths = set()
    for end, row in zip(first_episodes(vec, full, options={"rows": rows}), rows, strict=True):
        ref = single_episode(single, full, options={"row": row})
        lengths.add(len(ref["obs"]))
        assert end["row"] == row
        np.testing.assert_allclose(end["scores"], ref["scores"], atol=1e-3)
        assert (end["pred"], end["pred_norm"]) == (ref["pred"], ref["pred_norm"])
        assert end["reward"] == pytest.approx(ref["reward"], abs=1e-3)
        np.testing.assert_allclose(np.stack(end["obs"]), np.stack(ref["obs"]), atol=1e-4)
    # seeds: row i of reset(seed=s) is the single env's reset(seed=s + i)
    for i, end in enumerate(first_episodes(vec, full, seed=7)):
        ref = single_episode(single, full, seed=7 + i)
        assert end["row"] == ref["row"]
        np.testing.assert_allclose(end["scores"], ref["scores"], atol=1e-3)
    # endings shared a forward only when asked to: the block forward with NEXT_STEP, one of their own with SAME_STEP
    if not batch_scoring:
        assert not batched_rows and not any(packed for packed, _ in shared)
    elif mode == "next_step":
        assert any(packed for packed, _ in shared) and not batched_rows
    else:
        assert max(batched_rows) > 1 and not any(packed for packed, _ in shared)
    vec.close()


@pytest.mark.parametrize("layout", ["by-row", "together", "padded"])
def test_endings_join_the_block_forward_of_the_rows_that_go_on(tiny_model, monkeypatch, layout):
    """batch_scoring, NEXT_STEP, prompts of different lengths: a row's endings are scored in the same forward
    as the other rows' next blocks (packed rows beside causal blocks), and every row's scores, predictions
    and observations are the single env's, in each layout of the forward (envs.batched_forward): padding-free
    attending row by row (a CPU) or all rows together (a GPU), and right-padded (a model whose
    attention cannot be replaced)."""
    monkeypatch.setattr(envs.batched_forward, "ATTEND_BY_ROW", layout == "by-row")
    if layout == "padded":
        monkeypatch.setattr(envs.batched_forward, "packs_rows", lambda model: False)
    mixed, groups, layouts = [], [], []
    of = envs.batched_forward.RowLayout.of
    monkeypatch.setattr(envs.batched_forward.RowLayout, "of", lambda *a, **k: layouts.append(1) or of(*a, **k))

    def forward(model, caches, rows, *args, **kwargs):
        packed = sum(row.visible is not None for row in rows)
        mixed.append(0 < packed < len(rows))
        out = forward_rows(model, caches, rows, *args, **kwargs)
        if mixed[-1]:
            groups.append((len(out.groups), len(rows)))
        return out

    monkeypatch.setattr(envs.vector, "forward_rows", forward)
    options = dict(shots=2, split="train", interval=33)  # prompts of 99 and 100 tokens: 3 and 4 blocks
    vec, single = make_vec(tiny_model, num_envs=4, batch_scoring=True, **options), make_env(tiny_model, **options)
    full = single.bits.index(16)
    assert len(set(vec.reset(seed=3)[1]["blocks"].tolist())) > 1  # rows end in different steps
    for i, end in enumerate(first_episodes(vec, full, seed=3)):
        ref = single_episode(single, full, seed=3 + i)
        assert end["row"] == ref["row"]
        np.testing.assert_allclose(end["scores"], ref["scores"], atol=1e-3)
        assert (end["pred"], end["pred_norm"]) == (ref["pred"], ref["pred_norm"])
        np.testing.assert_allclose(np.stack(end["obs"]), np.stack(ref["obs"]), atol=1e-4)
    assert any(mixed)
    # by row: a group per row; together or padded: all rows in one
    assert groups and all(n == (rows if layout == "by-row" else 1) for n, rows in groups)
    assert bool(layouts) == (layout != "padded")  # padding-free unless the model's attention cannot be replaced
    vec.close()


def test_rows_of_different_lengths_are_padded(tiny_model):
    vec = make_vec(tiny_model, num_envs=4, shots=2)
    _, info = vec.reset(seed=3)
    assert len(set(info["prompt_tokens"].tolist())) > 1  # the padding and masks are exercised
    vec.close()


@pytest.mark.parametrize(
    "bits,action,extra",
    [
        ((2, 4, 8, 16), 0, {}),
        ((2, (4, 2), 16), 1, {}),
        ((2, 4, 8, 16), 0, {"rotate_keys": True, "sink_tokens": 2}),
        ((2, 4, 8, 16), 0, {"batch_scoring": False}),
    ],
    ids=["2bit", "k4v2", "2bit-rotated", "2bit-endings-row-by-row"],
)
def test_quantized_paired_difference_ci_contains_zero(tiny_model, bits, action, extra):
    n = 4
    extra = dict(extra)
    batch_scoring = extra.pop("batch_scoring", True)  # the default: endings in the block forward
    vec = make_vec(tiny_model, num_envs=n, bits=bits, shots=2, batch_scoring=batch_scoring, **extra)
    single = make_env(tiny_model, bits=bits, shots=2, **extra)
    if extra.get("rotate_keys"):
        vec.reset(seed=0)
        assert all(env._episode.cache.rotate_keys for env in vec.envs)
    batched, alone = [], []
    for seed in range(0, 52, n):
        for i, end in enumerate(first_episodes(vec, action, seed=seed)):
            ref = single_episode(single, action, seed=seed + i)
            assert end["row"] == ref["row"]
            batched.append(end["loglik_delta"])
            alone.append(ref["loglik_delta"])
    assert len(batched) >= 50 and np.std(alone) > 0  # the setting really damages the scores
    ci = paired_diff_ci(batched, alone)
    assert ci.lo - 1e-9 <= 0 <= ci.hi + 1e-9, ci
    vec.close()


# --- autoreset -------------------------------------------------------------------------------------------
def test_next_step_autoreset(tiny_model):
    vec = make_vec(tiny_model, num_envs=2)
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    vec.reset(seed=0)  # no rows list: ended rows restart on drawn items
    ended = None
    for _ in range(50):
        obs, reward, term, trunc, info = vec.step(np.zeros(2, dtype=np.int64))
        if term.any():
            ended = term.copy()
            break
    assert ended is not None
    obs, reward, term, trunc, info = vec.step(np.zeros(2, dtype=np.int64))
    i = int(np.argmax(ended))
    assert reward[i] == 0 and not term[i] and not trunc[i]
    assert info["_blocks"][i] and "loglik_delta" not in info or not info["_loglik_delta"][i]
    assert info["blocks"][i] >= 1 and "rewards" not in info or not info["_rewards"][i]
    assert obs[i][vec.observation_names.index("block_frac")] == 0 if "block_frac" in vec.observation_names else True
    obs, reward, term, trunc, info = vec.step(np.zeros(2, dtype=np.int64))  # the reset row steps again
    assert info["_rewards"][i]
    vec.close()


# --- vector env sanity ---------------------------------------------------------------------------------
def test_spaces_dtypes_and_seeding(tiny_model):
    vec = make_vec(tiny_model, num_envs=3)
    assert vec.observation_space.shape == (3, *vec.single_observation_space.shape)
    assert vec.action_space == gym.spaces.MultiDiscrete([4, 4, 4])
    obs, info = vec.reset(seed=11)
    assert obs.dtype == np.float32 and obs in vec.observation_space
    actions = vec.action_space.sample()
    trace = [obs]
    for _ in range(6):
        obs, reward, term, trunc, info = vec.step(actions)
        assert obs in vec.observation_space and reward.dtype == np.float64
        assert reward.shape == term.shape == trunc.shape == (3,) and term.dtype == trunc.dtype == np.bool_
        trace.append(obs)
    again = [vec.reset(seed=11)[0]] + [vec.step(actions)[0] for _ in range(6)]
    np.testing.assert_array_equal(np.stack(trace), np.stack(again))
    vec.close()


def test_refuses_what_it_cannot_batch(tiny_model):
    with pytest.raises(ValueError, match="mixed-precision cache only"):
        make_vec(tiny_model, cache="dynamic", bits=(16,))
    with pytest.raises(ValueError, match="saliency"):
        make_vec(tiny_model, features=("saliency",))
    with pytest.raises(ValueError, match="num_envs"):
        KVPrecisionVectorEnv(0)
    with pytest.raises(ValueError, match="batch_scoring"):
        KVPrecisionVectorEnv(2, batch_scoring=None)


def test_same_step_autoreset(tiny_model):
    vec = make_vec(tiny_model, num_envs=2, autoreset_mode="same_step")
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    vec.reset(seed=0)  # no rows list: ended rows restart on drawn items
    for _ in range(50):
        obs, reward, term, trunc, info = vec.step(np.zeros(2, dtype=np.int64))
        if term.any():
            break
    i = int(np.argmax(term))
    assert info["_final_obs"][i] and info["_final_info"][i] and "loglik_delta" in info["final_info"]
    assert info["_blocks"][i]  # the new episode's reset info
    assert obs[i][vec.observation_names.index("progress")] == pytest.approx(1 / info["blocks"][i])
    assert not np.array_equal(obs[i], info["final_obs"][i])
    vec.close()


@pytest.mark.parametrize("mode", ["next_step", "same_step"])
def test_rows_queue_runs_each_row_once_then_idles(tiny_model, mode):
    vec, single = make_vec(tiny_model, num_envs=2, autoreset_mode=mode), make_env(tiny_model)
    rows = [100, 101, 103, 105, 107]
    vec.reset(options={"rows": rows})
    ended: dict[int, dict] = {}
    for _ in range(200):
        obs, reward, term, trunc, info = vec.step(np.full(2, 3))
        for i in np.nonzero(term)[0]:
            final = info["final_info"] if mode == "same_step" and info.get("_final_info", [False] * 2)[i] else info
            ended[int(final["row"][i])] = final["scores"][i]
        if vec.idle.all():
            break
    assert sorted(ended) == rows and vec.idle.all()
    for row in rows[2:]:
        ref = single_episode(single, 3, options={"row": row})
        np.testing.assert_allclose(ended[row], ref["scores"], atol=1e-3)
    obs, reward, term, trunc, info = vec.step(np.full(2, 3))  # idle rows sit out
    assert not term.any() and (reward == 0).all() and not info
    vec.close()


def test_kv_error_features_and_layer_groups_match_single_env():
    from _tiny_env import tiny_model_with_layers

    model, tok = tiny_model_with_layers(4)
    kw = dict(lm=model, tokenizer=tok, items=ITEMS, **TINY_CONFIG, layer_groups=2,
              features=("kv_error", "entropy", "attn_var", "last_bits"))
    vec = gym.make_vec(envs.ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", **kw)
    single = KVPrecisionEnv(**kw)
    assert vec.action_space.shape == (2, 2)
    # 16 bits in the first layer group, 4 in the second
    assert_vector_follows_single(vec, single, [101, 104], np.array([3, 1]), atol=1e-4)
    vec.close()
