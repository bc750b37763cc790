"""The token selector (agents.token_select): window features, the logistic fit and its threshold, the
JSON file, and ``TokenSelectPolicy`` (``select:<path>``) on the tiny passkey env with ``protect_bits``;
plus how settings-only policies act there and ``Policy.apply_masks``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envs"))
from _passkey_source import SOURCE  # noqa: E402

from agents.fixed import FixedBitsPolicy  # noqa: E402
from agents.registry import make_policy  # noqa: E402
from agents.rollout import rollout  # noqa: E402
from agents.token_select import (  # noqa: E402
    TokenSelector,
    TokenSelectPolicy,
    fit_selector,
    token_columns,
    window_features,
)
from envs.features import TokenVocabulary  # noqa: E402
from envs.kv_precision import KVPrecisionEnv  # noqa: E402

SLOTS = 64
TOKEN_FEATURES = ["digits", "capital", "word_start", "punct", "token_rank"]
ENV = dict(model="tiny-random-llama", task="passkey", interval=SLOTS, group_size=32, eval_size=4, split="eval",
           task_options={"length": 640, "items": 12, "keys": 1}, protect_bits=4, token_features=TOKEN_FEATURES,
           sink_tokens=4, bits=[2, 4])


def _env(tiny_model, **overrides) -> KVPrecisionEnv:
    model, tokenizer = tiny_model
    return KVPrecisionEnv(lm=model, tokenizer=tokenizer, items=SOURCE, **{**ENV, **overrides})


@pytest.fixture(scope="module")
def env(tiny_model):
    e = _env(tiny_model)
    yield e
    e.close()


def _selector(features, weights, bias=0.0, threshold=0.5, window=0, setting="2") -> TokenSelector:
    """A hand-made selector with no standardisation (mean 0, std 1)."""
    width = 2 * len(features)
    return TokenSelector(list(features), window, [0.0] * width, [1.0] * width, list(weights), bias, threshold, setting)


def _token_values(obs: np.ndarray, names, features) -> np.ndarray:
    """[F, S] per-token values read from an observation by name (not through token_columns)."""
    names = list(names)
    return np.array([[obs[names.index(f"{f}@{i}")] for i in range(SLOTS)] for f in features])


# ------------------------------------------------------------------------------------------- window
@pytest.mark.parametrize("window", [0, 1, 3, 20])
def test_window_features_against_a_direct_loop(window):
    rng = np.random.default_rng(0)
    values = rng.random((3, 2, 10))
    got = window_features(values, window)
    assert got.shape == (3, 10, 4) and got.dtype == np.float32
    for n in range(3):
        for s in range(10):
            lo, hi = max(0, s - window), min(10, s + window + 1)
            for f in range(2):
                assert got[n, s, f] == pytest.approx(values[n, f, s])
                assert got[n, s, 2 + f] == pytest.approx(values[n, f, lo:hi].mean(), rel=1e-6)


def test_token_columns_are_feature_major_in_slot_order():
    names = ["entropy_mean", "b@1", "a@0", "b@0", "a@1", "progress"]
    assert token_columns(names, ["a", "b"]) == ([2, 4, 3, 1], 2)
    with pytest.raises(ValueError, match="token feature 'c'.*token_features"):
        token_columns(names, ["a", "c"])
    with pytest.raises(ValueError, match="slots"):
        token_columns([*names, "a@2"], ["a", "b"])


# ---------------------------------------------------------------------------------------------- fit
def _synthetic(episodes=6, blocks=5, seed=0):
    """Feature 0 a 0/1 flag, feature 1 noise; the label is "feature 0 == 1". Each episode's last block is
    short: its last 4 slots are padding (label -1) whose flag is 1, which would look like false
    negatives if they were fitted on."""
    rng = np.random.default_rng(seed)
    values, labels = [], []
    for _ in range(episodes):
        v = np.stack([rng.random((blocks, 16)) < 0.2, rng.random((blocks, 16))], axis=1).astype(np.float64)
        lab = v[:, 0, :].astype(np.float32).copy()
        v[-1, 0, 12:] = 1.0
        lab[-1, 12:] = -1
        values.append(v)
        labels.append(lab)
    return values, labels


def _found(selector, values, labels):
    picked = hit = positives = 0
    for v, lab in zip(values, labels, strict=True):
        marks = (selector.scores(v) > selector.threshold) & (lab >= 0)
        picked += marks.sum()
        hit += (marks & (lab == 1)).sum()
        positives += (lab == 1).sum()
    return picked, hit, positives


def test_fit_learns_a_flag_and_ignores_padded_slots():
    values, labels = _synthetic()
    selector = fit_selector(values, labels, ["flag", "noise"], 2, window=2)
    picked, hit, positives = _found(selector, values, labels)
    assert hit / picked >= 0.95 and hit / positives >= 0.95
    valid = sum(int((lab >= 0).sum()) for lab in labels)
    assert selector.info["tokens"] == valid  # the -1 slots are left out
    assert selector.info["evidence_tokens"] == positives
    assert selector.info["precision"] >= 0.95 and selector.info["recall"] >= 0.95
    assert selector.weights[0] > 0 and abs(selector.weights[0]) > 5 * abs(selector.weights[1])
    assert selector.setting == "2" and selector.features == ["flag", "noise"] and selector.window == 2
    # held-out episodes of the same kind
    test_v, test_l = _synthetic(seed=1)
    picked, hit, positives = _found(selector, test_v, test_l)
    assert hit / picked >= 0.95 and hit / positives >= 0.95


@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_threshold_keeps_keep_ratio_times_the_positives(keep_ratio):
    values, labels = _synthetic()
    selector = fit_selector(values, labels, ["flag", "noise"], (4, 2), keep_ratio=keep_ratio)
    picked, hit, positives = _found(selector, values, labels)
    assert abs(picked - keep_ratio * positives) <= 1
    assert hit == picked  # the kept ones are the surest: all positives
    assert selector.info["picked_tokens"] == picked and selector.setting == "k4v2"


def test_fit_errors():
    values, labels = _synthetic(episodes=2)
    with pytest.raises(ValueError, match="keep_ratio"):
        fit_selector(values, labels, ["a", "b"], 2, keep_ratio=0)
    with pytest.raises(ValueError, match="one label array per episode"):
        fit_selector(values, labels[:1], ["a", "b"], 2)
    with pytest.raises(ValueError, match="no evidence token"):
        fit_selector(values, [np.where(lab > 0, 0, lab) for lab in labels], ["a", "b"], 2)
    with pytest.raises(ValueError, match="do not match"):
        fit_selector(values, [lab[:, :8] for lab in labels], ["a", "b"], 2)


# -------------------------------------------------------------------------------------------- file
def test_save_load_roundtrip(tmp_path):
    values, labels = _synthetic(episodes=2)
    selector = fit_selector(values, labels, ["flag", "noise"], 2, window=3)
    path = selector.save(tmp_path / "sub" / "selector.json")
    loaded = TokenSelector.load(path)
    assert dataclasses.asdict(loaded) == dataclasses.asdict(selector)
    assert fit_selector(values, labels, ["flag", "noise"], 2, window=3, tail_tokens=16).tail_tokens == 16
    doc = json.loads(path.read_text())
    del doc["tail_tokens"]  # a selector saved before tail_tokens existed loads with none
    path.write_text(json.dumps(doc))
    assert TokenSelector.load(path).tail_tokens == 0
    assert np.array_equal(loaded.scores(values[0]), selector.scores(values[0]))


def test_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_selector"):
        TokenSelector.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("not json at all")
    with pytest.raises(ValueError, match="not a token selector"):
        TokenSelector.load(bad)
    bad.write_text(json.dumps({"features": ["digits"], "window": 1}))
    with pytest.raises(ValueError, match="not a token selector"):
        TokenSelector.load(bad)
    doc = dataclasses.asdict(_selector(["digits"], [1.0, 0.0]))
    doc["weights"] = [1.0]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="mean/std/weights need 2 entries"):
        TokenSelector.load(bad)


# ---------------------------------------------------------------------------------- policy on the env
def test_select_policy_marks_what_the_selector_decides(env, tmp_path):
    selector = _selector(TOKEN_FEATURES, [0, 1.0, 0, 0, 0, 2.0, 0, 0, 0, 0], bias=-0.25, threshold=0.5, window=2)
    path = selector.save(tmp_path / "sel.json")
    policy = make_policy(f"select:{path}", env=env)
    assert isinstance(policy, TokenSelectPolicy) and policy.name == "select" and policy.protect_slots == SLOTS
    obs, _ = env.reset(options={"row": env.items[0].row})
    done, any_mark = False, False
    while not done:
        action, _ = policy.predict(obs)
        assert action.shape == (1 + SLOTS,) and action[0] == env.bits.index(2)
        values = _token_values(obs, env.observation_names, TOKEN_FEATURES)
        want = (selector.scores(values[None])[0] > selector.threshold).astype(np.int64)
        assert np.array_equal(action[1:], want)
        any_mark |= bool(want.any())
        batch, _ = policy.predict(np.stack([obs, obs]))
        assert batch.shape == (2, 1 + SLOTS) and np.array_equal(batch[0], action)
        obs, _, done, _, _ = env.step(action)
    assert any_mark


def test_a_digit_selector_protects_exactly_the_digit_tokens(env, tmp_path):
    path = _selector(["digits"], [1.0, 0.0]).save(tmp_path / "digits.json")
    policy = make_policy(f"select:{path}", env=env)
    row = env.items[1].row
    episode = rollout(env, policy, options={"row": row})
    vocab = TokenVocabulary.from_tokenizer(env.tokenizer)
    prompt = env.episode_inputs(row)[1]
    digits = [i for i, t in enumerate(prompt) if vocab.digit[t] and i >= 4]
    assert len(digits) >= 10  # the key, twice
    assert sum(info["protected_tokens"] for info in episode.infos) == len(digits)


def test_masks_clear_marks_past_a_short_blocks_end(env, tmp_path):
    path = _selector(["digits"], [0.0, 0.0], bias=1.0, threshold=0.0).save(tmp_path / "all.json")  # marks all
    policy = make_policy(f"select:{path}", env=env)
    obs, _ = env.reset(options={"row": env.items[0].row})
    spans = env.block_spans()
    for start, end in spans:
        unmasked, _ = policy.predict(obs)
        masked, _ = policy.predict(obs, action_masks=env.action_masks())
        assert unmasked[1:].all()
        assert masked[1:].tolist() == [int(i < end - start) for i in range(SLOTS)]
        obs, _, done, _, info = env.step(masked)
    assert done and info["requested_protected_tokens"] == spans[-1][1] - spans[-1][0]


@pytest.mark.parametrize("tail", [5, 200])
def test_tail_tokens_mark_the_prompts_last_tokens_and_nothing_else(tiny_model, tmp_path, tail):
    """A selector that scores no token above its threshold, with ``tail_tokens``: only the last block's last
    ``tail`` tokens are marked (all of that block when it is shorter; never an earlier block)."""
    env = _env(tiny_model, features=["blocks_left"])
    path = dataclasses.replace(_selector(["digits"], [0.0, 0.0], bias=-1.0, threshold=0.0), tail_tokens=tail).save(
        tmp_path / "tail.json")
    policy = make_policy(f"select:{path}", env=env)
    row = env.items[2].row
    episode = rollout(env, policy, options={"row": row})
    spans = env.block_spans()
    last = spans[-1][1] - spans[-1][0]
    assert [info["protected_tokens"] for info in episode.infos] == [0] * (len(spans) - 1) + [min(tail, last)]
    final, _ = policy.predict(episode.observations[-1])
    assert final[1:].tolist() == [int(last - tail <= i < last) for i in range(SLOTS)]
    env.close()


def test_tail_tokens_need_blocks_left_and_token_rank(env, tiny_model, tmp_path):
    path = dataclasses.replace(_selector(["digits"], [1.0, 0.0]), tail_tokens=8).save(tmp_path / "tail.json")
    with pytest.raises(ValueError, match=r"does not observe \['blocks_left'\]"):
        make_policy(f"select:{path}", env=env)  # the module's env observes token_rank but not blocks_left
    no_rank = _env(tiny_model, features=["blocks_left"], token_features=["digits"])
    with pytest.raises(ValueError, match=r"does not observe \['token_rank'\]"):
        make_policy(f"select:{path}", env=no_rank)
    no_rank.close()
    doc = dataclasses.asdict(_selector(["digits"], [1.0, 0.0]))
    doc["tail_tokens"] = -1
    bad = tmp_path / "bad_tail.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="tail_tokens must be an integer >= 0"):
        TokenSelector.load(bad)
    values, labels = _synthetic(episodes=2)
    with pytest.raises(ValueError, match="tail_tokens"):
        fit_selector(values, labels, ["flag", "noise"], 2, tail_tokens=-3)


def test_select_policy_errors(env, tiny_model, tmp_path):
    path = _selector(["digits"], [1.0, 0.0]).save(tmp_path / "digits.json")
    plain = _env(tiny_model, protect_bits=None, token_features=[])
    with pytest.raises(ValueError, match="token feature 'digits'.*token_features"):
        make_policy(f"select:{path}", env=plain)
    plain.close()
    no_protect = _env(tiny_model, protect_bits=None)  # observes the tokens but cannot mark them
    policy = make_policy(f"select:{path}", env=no_protect)
    obs, _ = no_protect.reset(options={"row": no_protect.items[0].row})
    with pytest.raises(ValueError, match="protect_bits"):
        policy.predict(obs)
    no_protect.close()
    eight = _selector(["digits"], [1.0, 0.0], setting="8").save(tmp_path / "eight.json")
    with pytest.raises(ValueError, match="does not offer"):
        make_policy(f"select:{eight}", env=env)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a token selector"):
        make_policy(f"select:{bad}", env=env)
    with pytest.raises(ValueError, match="select:"):
        make_policy("select", env=env)


# ----------------------------------------------------------------------------------- base Policy
def test_a_settings_only_policy_marks_nothing(env):
    policy = make_policy("fixed:2+s4", env=env)
    assert policy.protect_slots == SLOTS
    obs, _ = env.reset(options={"row": env.items[0].row})
    action, _ = policy.predict(obs)
    assert action.shape == (1 + SLOTS,) and action[0] == env.bits.index(2) and not action[1:].any()
    batch, _ = policy.predict(np.stack([obs, obs, obs]))
    assert batch.shape == (3, 1 + SLOTS) and not batch[:, 1:].any()
    four, _ = make_policy("fixed:4+s4", env=env).predict(obs, action_masks=env.action_masks())
    assert four[0] == env.bits.index(4) and not four[1:].any()
    _, _, _, _, info = env.step(action)
    assert info["protected_tokens"] == 0


def test_apply_masks_clears_forbidden_marks_and_rules_the_setting():
    policy = FixedBitsPolicy(["x"], [2, 4], 4)
    policy.set_protect_slots(4)
    masks = np.array([True, False, 1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)  # 4 bits forbidden; slots 2, 3 past the end
    assert policy.apply_masks(np.array([1, 1, 1, 1, 1]), masks).tolist() == [0, 1, 1, 0, 0]
    rows = np.array([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]])
    both = np.stack([masks, np.ones(10, dtype=bool)])
    assert policy.apply_masks(rows, both).tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    action, _ = policy.predict(np.zeros(1, dtype=np.float32), action_masks=masks)
    assert action.tolist() == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="need 10"):
        policy.apply_masks(np.array([1, 1, 1, 1, 1]), masks[:8])
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="protect slots"):
            policy.set_protect_slots(bad)
    grouped = FixedBitsPolicy(["x"], [2, 4], 4)
    grouped.set_layer_groups(2)
    with pytest.raises(ValueError, match="layer_groups 1"):
        grouped.set_protect_slots(4)
