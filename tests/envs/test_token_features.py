"""Per-token features for token choice: the ``capital``/``word_start``/``punct`` vocabulary masks, the
``token_rank`` scale, and ``FeatureSet(names, token_features, slots)``'s ``name@i`` entries (0 past the
block's end; a feature in both lists computed once per block)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from envs.features import FEATURES, BlockContext, FeatureSet, RunningFrequency, TokenVocabulary
from envs.observation import BlockObserver

TEXTS = ["A", " b", ".", "7", " Hello", "!?", "\nX", " ", "a1", " 42", "x"]


def _context(observer: BlockObserver, ids: list[int], vocab_size: int = len(TEXTS)) -> BlockContext:
    t = len(ids)
    empty_cache = SimpleNamespace(block_bits=[])  # nothing committed: the state these features ignore
    return observer.context(torch.tensor(ids), torch.zeros(t, vocab_size), torch.full((t,), -1), cache=empty_cache)


def _ids(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_vocabulary_masks_from_texts():
    vocab = TokenVocabulary.from_texts(TEXTS)
    assert _ids(vocab.capital) == [0, 4, 6]  # "A", " Hello", "\nX"
    assert _ids(vocab.word_start) == [1, 4, 6, 7, 9]  # a leading space or newline
    assert _ids(vocab.punct) == [2, 5]  # "." and "!?"; a bare space is not punctuation
    assert _ids(vocab.digit) == [3, 8, 9]
    assert all(m.dtype == torch.bool and m.shape == (len(TEXTS),) for m in
               (vocab.digit, vocab.capital, vocab.word_start, vocab.punct))


def test_vocabulary_without_the_new_masks_marks_nothing():
    vocab = TokenVocabulary(torch.tensor([True, False]))
    assert not vocab.capital.any() and not vocab.word_start.any() and not vocab.punct.any()


def test_vocabulary_of_the_tiny_tokenizer_marks_capitals_spaces_and_punctuation(tiny_model):
    tokenizer = tiny_model[1]
    vocab = TokenVocabulary.from_tokenizer(tokenizer)
    assert vocab.capital.shape == vocab.digit.shape == (len(tokenizer),)
    caps = tokenizer.encode("ABZ", add_special_tokens=False)
    lower = tokenizer.encode("abz", add_special_tokens=False)
    punct = tokenizer.encode(".,!?", add_special_tokens=False)
    assert vocab.capital[caps].all() and not vocab.capital[lower].any()
    assert vocab.punct[punct].all() and not vocab.punct[caps + lower].any()
    assert vocab.word_start[tokenizer.encode(" ", add_special_tokens=False)].all()


def test_token_features_are_exposed_slot_by_slot_with_zeros_past_the_block():
    vocab = TokenVocabulary.from_texts(TEXTS)
    names = ["capital", "word_start", "punct", "digits", "token_rank"]
    fs = FeatureSet(["digits"], token_features=names, slots=8)
    assert fs.observation_names == ("digits_mean", "digits_max") + tuple(
        f"{n}@{i}" for n in names for i in range(8))
    low, high = fs.bounds()
    assert len(low) == len(high) == len(fs)
    observer = BlockObserver(fs, 2, vocab)
    ids = [0, 1, 2, 3, 10]  # "A", " b", ".", "7", "x": 5 tokens in 8 slots
    obs = dict(zip(fs.observation_names, observer.observe(_context(observer, ids)), strict=True))
    expected = {
        "capital": [1, 0, 0, 0, 0], "word_start": [0, 1, 0, 0, 0], "punct": [0, 0, 1, 0, 0], "digits": [0, 0, 0, 1, 0],
        "token_rank": [math.log1p(i) / math.log(len(TEXTS)) for i in ids],
    }
    for name, values in expected.items():
        got = [obs[f"{name}@{i}"] for i in range(8)]
        assert got == pytest.approx(values + [0.0] * 3), name
    assert obs["digits_mean"] == pytest.approx(1 / 5) and obs["digits_max"] == 1.0
    assert obs["token_rank@4"] == pytest.approx(1.0)  # the last id of the vocabulary


def test_a_feature_in_both_lists_is_computed_once_per_block():
    """``rarity`` counts each token as it sees it: computed twice, the second pass would see every token
    again and its block summaries would not be the summaries of its per-token entries."""
    fs = FeatureSet(["rarity", "novelty"], token_features=["rarity", "novelty"], slots=6)
    observer = BlockObserver(fs, 3)
    blocks = [[5, 6, 5, 7], [6, 8, 8, 5, 9, 9], [5]]
    reference = RunningFrequency()
    for ids in blocks:
        obs = dict(zip(fs.observation_names, observer.observe(_context(observer, ids, 16)), strict=True))
        per_token = [obs[f"rarity@{i}"] for i in range(len(ids))]
        assert per_token == pytest.approx(reference.observe(ids))  # one count per token, in order
        assert obs["rarity_mean"] == pytest.approx(np.mean(per_token))
        assert obs["rarity_max"] == pytest.approx(max(per_token))
        novelty = [obs[f"novelty@{i}"] for i in range(len(ids))]
        assert obs["novelty_mean"] == pytest.approx(np.mean(novelty))
        assert all(obs[f"rarity@{i}"] == 0.0 for i in range(len(ids), 6))
    # the first block's novelty: new, new, seen in the block, new (not "all seen" from a second pass)
    first = BlockObserver(FeatureSet(["novelty"], token_features=["novelty"], slots=4), 1)
    assert list(first.observe(_context(first, [5, 6, 5, 7], 16))) == pytest.approx([3 / 4, 1, 1, 0, 1])


def test_feature_set_errors():
    with pytest.raises(ValueError, match="per-token features"):
        FeatureSet(["digits"], token_features=["progress"], slots=4)
    with pytest.raises(ValueError, match="slots >= 1"):
        FeatureSet(["digits"], token_features=["digits"], slots=0)
    with pytest.raises(ValueError, match="duplicate token feature"):
        FeatureSet(["digits"], token_features=["punct", "punct"], slots=4)
    with pytest.raises(Exception, match="no_such_feature"):
        FeatureSet(["digits"], token_features=["no_such_feature"], slots=4)
    # no token features: slots are ignored, the observation is the block summaries only
    assert FeatureSet(["digits"], slots=8).observation_names == ("digits_mean", "digits_max")
    assert FEATURES.get("token_rank")().per_token and FEATURES.get("capital")().needs == frozenset({"vocab"})
