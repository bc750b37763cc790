"""The content features ``digits`` and ``novelty``: hand-checked values on crafted tokens, and the
values an env episode observes on a passkey prompt against a direct count over its tokens."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _passkey_source import SOURCE

from envs.features import BlockContext, FeatureSet, TokenVocabulary
from envs.kv_precision import KVPrecisionEnv
from envs.observation import BlockObserver


def _context(observer: BlockObserver, ids: list[int]) -> BlockContext:
    t = len(ids)
    empty_cache = SimpleNamespace(block_bits=[])  # nothing committed: the state these features ignore
    return observer.context(torch.tensor(ids), torch.zeros(t, 8), torch.full((t,), -1), cache=empty_cache)


def test_vocabulary_marks_exactly_the_digit_tokens(tiny_model):
    tokenizer = tiny_model[1]
    vocab = TokenVocabulary.from_tokenizer(tokenizer)
    assert vocab.digit.shape == (len(tokenizer),) and vocab.digit.dtype == torch.bool
    digits = tokenizer.encode("0123456789", add_special_tokens=False)
    letters = tokenizer.encode("pass key abc.", add_special_tokens=False)
    assert vocab.digit[digits].all() and not vocab.digit[letters].any()
    # every id marked decodes to text with a digit, and no other does
    marked = {i for i in range(len(tokenizer)) if any(c.isdigit() for c in tokenizer.decode([i]))}
    assert set(torch.nonzero(vocab.digit).flatten().tolist()) == marked
    assert TokenVocabulary.from_tokenizer(tokenizer) is vocab  # computed once per tokenizer


def test_digits_on_a_crafted_block(tiny_model):
    tokenizer = tiny_model[1]
    observer = BlockObserver(FeatureSet(["digits"]), 2, TokenVocabulary.from_tokenizer(tokenizer))
    ids = tokenizer.encode("The pass key is 12345.", add_special_tokens=False)  # byte-level: 5 digit tokens
    mean, top = observer.observe(_context(observer, ids))
    assert mean == pytest.approx(5 / len(ids)) and top == 1.0
    plain = tokenizer.encode("No number here.", add_special_tokens=False)
    assert list(observer.observe(_context(observer, plain))) == [0.0, 0.0]


def test_digits_needs_the_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        BlockObserver(FeatureSet(["digits"]), 2)


def test_novelty_counts_first_occurrences_across_blocks():
    observer = BlockObserver(FeatureSet(["novelty", "rarity"]), 3)
    first = observer.observe(_context(observer, [5, 6, 5, 7]))  # new, new, seen in the block, new
    second = observer.observe(_context(observer, [6, 8, 8]))  # seen in block 0, new, seen
    third = observer.observe(_context(observer, [5, 6]))
    assert first[0] == pytest.approx(3 / 4) and second[0] == pytest.approx(1 / 3) and third[0] == 0.0
    # rarity beside it still counts from the episode's first token (the two keep separate state)
    assert first[1] == pytest.approx(np.mean([0.0, np.log(2), np.log(3 / 2), np.log(4)]))


def test_env_episode_observes_digits_and_novelty_of_its_blocks(tiny_model):
    """On a passkey prompt: per block, the digit share and the first-occurrence share of its tokens."""
    model, tokenizer = tiny_model
    env = KVPrecisionEnv(lm=model, tokenizer=tokenizer, items=SOURCE, model="tiny-random-llama", task="passkey",
                         interval=64, group_size=32, eval_size=4, split="eval",
                         task_options={"length": 640, "items": 12, "depth": 0.5},
                         features=("digits", "novelty"))
    try:
        row = env.items[0].row
        _, prompt, _ = env.episode_inputs(row)
        digit = [any(c.isdigit() for c in tokenizer.decode([t])) for t in prompt]
        new = [t not in prompt[:i] for i, t in enumerate(prompt)]
        obs, _ = env.reset(options={"row": row})
        seen = [obs]
        done = False
        while not done:
            obs, _, done, _, _ = env.step(0)
            if not done:
                seen.append(obs)
        assert env.observation_names == ("digits_mean", "digits_max", "novelty_mean")
        blocks = [(s, min(s + 64, len(prompt))) for s in range(0, len(prompt), 64)]
        assert len(seen) == len(blocks)
        for (s, e), o in zip(blocks, seen, strict=True):
            assert o[0] == pytest.approx(np.mean(digit[s:e]))
            assert o[1] == float(any(digit[s:e]))
            assert o[2] == pytest.approx(np.mean(new[s:e]))
        assert sum(o[1] for o in seen) >= 1  # the needle's key lies in some block (and the question has none)
    finally:
        env.close()
