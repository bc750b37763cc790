"""The env's per-token choice (``EnvConfig.protect_bits``) on the tiny passkey env: the action space and
token-by-token observations, marks against the same env without them, the exact bits marks cost, the
budget's trim of marks, the action masks, the evidence tokens, and config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _passkey_source import SOURCE

from envs.features import TokenVocabulary
from envs.kv_precision import EnvConfig, KVPrecisionEnv

LENGTH = 640
ENV = dict(model="tiny-random-llama", task="passkey", interval=64, group_size=32, eval_size=4, split="eval")
TOKEN_FEATURES = ["digits", "capital", "word_start", "punct", "token_rank"]
PROTECT = dict(protect_bits=4, token_features=TOKEN_FEATURES, sink_tokens=4, bits=[2, 4])
SLOTS = 64


def _env(tiny_model, **overrides) -> KVPrecisionEnv:
    model, tokenizer = tiny_model
    return KVPrecisionEnv(lm=model, tokenizer=tokenizer, items=SOURCE, **{
        **ENV, "task_options": {"length": LENGTH, "items": 12, "keys": 1}, **PROTECT, **overrides})


@pytest.fixture(scope="module")
def env(tiny_model):
    e = _env(tiny_model)
    yield e
    e.close()


def _action(setting: int, slots) -> np.ndarray:
    action = np.zeros(1 + SLOTS, dtype=np.int64)
    action[0] = setting
    action[1 + np.asarray(list(slots), dtype=np.int64)] = 1
    return action


def _episode(env, row, action_of=lambda block: 0):
    """Every step's info of row ``row``; ``action_of(block)`` gives each block's action."""
    env.reset(options={"row": row})
    infos, done = [], False
    while not done:
        _, _, done, _, info = env.step(action_of(len(infos)))
        infos.append(info)
    return infos


def _final(info) -> dict:
    return {k: info[k] for k in ("scores", "avg_bits", "kv_bytes", "fp16_kv_bytes", "loglik_delta", "pred")}


# ------------------------------------------------------------------------------------ spaces and checkers
def test_env_checkers_pass(env):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_action_space_is_the_setting_then_a_mark_per_slot(env, tiny_model):
    assert env.action_space.shape == (1 + SLOTS,)
    assert env.action_space.nvec.tolist() == [2] + [2] * SLOTS
    assert env.protect_bits == 4
    plain = _env(tiny_model, protect_bits=None)
    assert plain.action_space.n == 2  # token features alone do not change the action
    assert plain.observation_names == env.observation_names
    plain.close()


def test_bad_actions_are_clear_errors(env):
    env.reset(options={"row": env.items[0].row})
    with pytest.raises(ValueError, match="65 integers"):
        env.step(0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(_action(2, []))
    bad = _action(0, [])
    bad[5] = 2
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(bad)


def test_observations_are_token_features_slot_by_slot(env):
    names = env.observation_names
    for f in TOKEN_FEATURES:
        columns = [names.index(f"{f}@{i}") for i in range(SLOTS)]
        assert columns == list(range(columns[0], columns[0] + SLOTS))  # consecutive, in slot order
    assert f"digits@{SLOTS}" not in names
    row = env.items[0].row
    obs, info = env.reset(options={"row": row})
    vocab = TokenVocabulary.from_tokenizer(env.tokenizer)
    prompt = env.episode_inputs(row)[1]
    spans = env.block_spans()
    assert spans[-1][1] - spans[-1][0] < SLOTS  # the last block is short: its tail slots are padding
    key_blocks = set(env.evidence_blocks())
    seen_digit = False
    for b, (start, end) in enumerate(spans):
        n = end - start
        for f, mask in (("digits", vocab.digit), ("capital", vocab.capital), ("word_start", vocab.word_start),
                        ("punct", vocab.punct)):
            got = [obs[names.index(f"{f}@{i}")] for i in range(SLOTS)]
            assert got == [float(mask[t]) for t in prompt[start:end]] + [0.0] * (SLOTS - n), (b, f)
        rank = [obs[names.index(f"token_rank@{i}")] for i in range(SLOTS)]
        assert all(r > 0 for r in rank[:n]) and all(r == 0 for r in rank[n:])
        seen_digit |= b in key_blocks and any(obs[names.index(f"digits@{i}")] for i in range(n))
        if b + 1 < len(spans):
            obs, *_ = env.step(_action(0, []))
    assert seen_digit  # the key's digits are observed where the key is


# --------------------------------------------------------------------------------------- marks and bits
def test_marking_nothing_is_the_env_without_protect_bits(env, tiny_model):
    plain = _env(tiny_model, protect_bits=None)
    for row in [it.row for it in env.items[:2]]:
        want = _episode(plain, row)
        nothing = _episode(env, row, lambda b: _action(0, []))
        # marks on sink tokens (block 0's first 4) are no marks: sinks are fp16 anyway
        sinks_only = _episode(env, row, lambda b: _action(0, range(4) if b == 0 else []))
        for infos in (nothing, sinks_only):
            assert _final(infos[-1]) == _final(want[-1])
            assert all(i["protected_tokens"] == 0 == i["requested_protected_tokens"] for i in infos)
        assert "protected_tokens" not in want[-1]
    plain.close()


def test_each_marked_token_costs_exactly_the_difference_of_bits(env):
    row = env.items[1].row
    marked_slots = [*range(10), *range(60, 64)]  # slots 60-63 lie past the short last block's end
    base = _episode(env, row, lambda b: _action(0, []))
    infos = _episode(env, row, lambda b: _action(0, marked_slots))
    spans = env.block_spans()
    prompt_tokens = spans[-1][1]
    expected = [sum(1 for i in marked_slots if i < end - start and start + i >= 4) for start, end in spans]
    assert [i["protected_tokens"] for i in infos] == expected
    assert [i["requested_protected_tokens"] for i in infos] == expected  # no budget: nothing trimmed
    assert expected[0] == 10 - 4 + 4 and expected[-1] == 10  # sinks and padded slots are not marks
    marked = sum(expected)
    assert infos[-1]["avg_bits"] - base[-1]["avg_bits"] == pytest.approx((4 - 2) * marked / prompt_tokens, abs=1e-12)
    assert base[-1]["avg_bits"] == pytest.approx((4 * 16 + 2 * (prompt_tokens - 4)) / prompt_tokens)
    assert infos[-1]["kv_bytes"] > base[-1]["kv_bytes"]
    assert infos[-1]["scores"] != base[-1]["scores"]  # the marked tokens really are stored differently
    assert not any(i["budget_enforced"] for i in infos)


def test_a_budget_trims_the_latest_marks(tiny_model):
    env = _env(tiny_model, bit_budget=2.5)
    row = env.items[0].row
    infos = _episode(env, row, lambda b: _action(0, range(SLOTS)))
    spans = env.block_spans()
    prompt_tokens = spans[-1][1]
    base_bits = 4 * 16 + 2 * (prompt_tokens - 4)
    allowed = math.floor((2.5 * prompt_tokens - base_bits) / (4 - 2))  # tokens at 4 instead of 2
    plain = [end - start - max(0, min(end, 4) - start) for start, end in spans]  # non-sink tokens per block
    kept, left = [], allowed
    for n in plain:  # the earliest marks are kept
        kept.append(min(n, left))
        left -= kept[-1]
    assert [i["protected_tokens"] for i in infos] == kept
    assert [i["requested_protected_tokens"] for i in infos] == plain
    assert kept[0] == plain[0] and 0 < sum(kept) < sum(plain)
    assert [i["budget_enforced"] for i in infos] == [k < n for k, n in zip(kept, plain, strict=True)]
    assert any(i["budget_enforced"] and i["protected_tokens"] < i["requested_protected_tokens"] for i in infos)
    assert infos[-1]["avg_bits"] <= 2.5
    assert infos[-1]["avg_bits"] == pytest.approx((base_bits + 2 * allowed) / prompt_tokens)
    assert all(i["setting"] == "2" for i in infos)
    # token by token, as stored: the sinks, then the earliest marks at 4 bits, every later token at 2
    stored = [seg.key_bits for seg in env._episode.cache.layers[0].segments for _ in range(seg.length)]
    assert stored == [16] * 4 + [4] * allowed + [2] * (prompt_tokens - 4 - allowed)
    env.close()


# ---------------------------------------------------------------------------------------- masks, evidence
def test_action_masks_forbid_marks_past_a_short_blocks_end(env):
    env.reset(options={"row": env.items[0].row})
    spans = env.block_spans()
    for b, (start, end) in enumerate(spans):
        masks = env.action_masks()
        assert masks.shape == (2 + 2 * SLOTS,) and masks.dtype == bool
        slots = masks[2:].reshape(SLOTS, 2)
        assert masks[:2].all() and slots[:, 0].all()  # no budget: every setting; leaving always allowed
        assert slots[:, 1].tolist() == [i < end - start for i in range(SLOTS)], b
        env.step(_action(0, []))
    assert not slots[:, 1].all()  # the last block was short
    assert env.action_masks().all() and len(env.action_masks()) == 2 + 2 * SLOTS  # after the episode


def test_action_masks_with_a_budget_keep_the_slot_layout(tiny_model):
    env = _env(tiny_model, bit_budget=2.2)
    assert env.action_masks().all() and len(env.action_masks()) == 2 + 2 * SLOTS  # before reset
    env.reset(options={"row": env.items[0].row})
    masks = env.action_masks()
    assert masks[:2].tolist() == [True, False]  # 4 bits for a whole block would break 2.2
    assert masks[2:].all()  # a full block: every slot may be marked (the env trims marks itself)
    env.close()


def test_evidence_tokens_hold_the_key(env):
    fresh = env.sibling()
    with pytest.raises(RuntimeError, match="before reset"):
        fresh.evidence_tokens()
    fresh.close()
    for item in env.items[:2]:
        _, info = env.reset(options={"row": item.row})
        evidence = env.evidence_tokens()
        prompt = env.episode_inputs(item.row)[1]
        assert len(evidence) == info["prompt_tokens"] == len(prompt)
        assert 0 < sum(evidence) < len(evidence)
        text = env.tokenizer.decode([t for t, e in zip(prompt, evidence, strict=True) if e])
        assert item.key in text
        # every token of the key's first occurrence is evidence
        full = env.tokenizer.decode(prompt)
        at = full.index(item.key)
        pieces = [env.tokenizer.decode(prompt[: i + 1]) for i in range(len(prompt))]
        covering = [i for i, p in enumerate(pieces) if at < len(p) <= at + len(item.key)]
        assert covering and all(evidence[i] for i in covering)
        # the block-level view agrees
        spans = env.block_spans()
        assert env.evidence_blocks() == [b for b, (s, e) in enumerate(spans) if any(evidence[s:e])]


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("overrides", "message"), [
    ({"layer_groups": 2}, "protect_bits needs layer_groups: 1 and cache: mixed"),
    ({"cache": "quanto", "bits": [4], "sink_tokens": 0}, "protect_bits needs layer_groups: 1 and cache: mixed"),
    ({"cache": "dynamic", "bits": [16], "sink_tokens": 0}, "protect_bits needs layer_groups: 1 and cache: mixed"),
    ({"protect_bits": 5}, "5"),
])
def test_config_errors(tiny_model, overrides, message):
    cfg = {**ENV, **PROTECT, **overrides}
    with pytest.raises(ValueError, match=message):
        EnvConfig.from_dict(cfg).validate()
    with pytest.raises(ValueError, match=message):
        _env(tiny_model, **overrides)


def test_token_feature_errors(tiny_model):
    with pytest.raises(Exception, match="no_such_feature"):
        _env(tiny_model, token_features=["digits", "no_such_feature"])
    with pytest.raises(ValueError, match="per-token features"):
        _env(tiny_model, token_features=["digits", "progress"])
    assert EnvConfig.from_dict({**ENV, **PROTECT, "protect_bits": [4, 2]}).protect_bits == (4, 2)
    assert EnvConfig.from_dict({**ENV, **PROTECT}).token_features == tuple(TOKEN_FEATURES)


def test_settings_by_name_become_canonical_in_the_config():
    """``--set env.protect_bits=k8v2`` and ``bits: [2, k4v2]`` are read as envs.settings spells them, so every
    reader of the config (train_mlp's menu, generate, the fixed policies' overrides) sees ints and pairs."""
    from experiments.config import load_config
    from experiments.evaluate import EvaluateConfig

    cfg = load_config(EvaluateConfig, None, ["env.protect_bits=k8v2", "env.bits=[2, k4v2, k4v4]"])
    assert cfg.env.protect_bits == (8, 2) and cfg.env.bits == (2, (4, 2), 4)
    assert EnvConfig.from_dict({"bits": ["2", "k3v2"], "protect_bits": "4"}).bits == (2, (3, 2))
    bad = load_config(EvaluateConfig, None, ["env.protect_bits=x9"]).env
    with pytest.raises(ValueError, match="cannot read setting 'x9'"):
        bad.validate()
