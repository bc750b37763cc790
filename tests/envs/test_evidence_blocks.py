"""Task.evidence and KVPrecisionEnv.evidence_blocks: where the answer lies, in blocks, on the tiny model."""

from __future__ import annotations

import pytest
from _passkey_source import SOURCE
from _tiny_env import ITEMS, make_env

from envs.evidence import _decoded_spans, evidence_char_spans, overlapping_blocks, token_char_spans
from envs.kv_precision import KVPrecisionEnv

LENGTH, INTERVAL = 256, 32


def _passkey_env(tiny_model, **options) -> KVPrecisionEnv:
    model, tokenizer = tiny_model
    return KVPrecisionEnv(
        lm=model, tokenizer=tokenizer, items=SOURCE, model="tiny-random-llama", task="passkey", interval=INTERVAL,
        group_size=32, eval_size=4, split="eval", task_options={"length": LENGTH, "items": 12, "keys": 1, **options},
    )


def _direct_blocks(env: KVPrecisionEnv, row: int) -> list[int]:
    """The needle's blocks computed directly: token counts of the prompt's prefixes before and through it."""
    item = env.episode_inputs(row)[0]
    context = env.task.context(item, [])
    (needle,) = env.task.evidence(item)
    start = context.index(needle)
    first = len(env.tokenizer.encode(context[:start]))  # the tiny tokenizer never merges across a sentence end
    last = len(env.tokenizer.encode(context[: start + len(needle)])) - 1
    return list(range(first // INTERVAL, last // INTERVAL + 1))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_evidence_blocks_hold_the_needle_and_move_with_depth(tiny_model, depth):
    env = _passkey_env(tiny_model, depth=depth)
    firsts = []
    for item in env.items:
        env.reset(options={"row": item.row})
        blocks = env.evidence_blocks()
        assert blocks == _direct_blocks(env, item.row)
        assert blocks and blocks == list(range(blocks[0], blocks[-1] + 1))  # one needle: consecutive blocks
        spans = env.block_spans()
        assert 0 <= blocks[0] and blocks[-1] < len(spans)
        firsts.append(blocks[0])
    n_blocks = len(env.block_spans())
    if depth == 0.0:
        assert max(firsts) <= 1 + 140 // INTERVAL  # right after the instruction
    if depth == 1.0:
        assert min(firsts) >= n_blocks - 4  # right before the question
    env.close()


def test_needle_block_moves_later_with_depth(tiny_model):
    first = {}
    for depth in (0.0, 0.5, 1.0):
        env = _passkey_env(tiny_model, depth=depth, length=640)  # ~15 filler sentences: room to move
        env.reset(options={"row": env.items[0].row})
        first[depth] = env.evidence_blocks()[0]
        env.close()
    assert first[0.0] < first[0.5] < first[1.0]


def test_several_keys_every_needle_by_default(tiny_model):
    """The question comes last: by default every needle is evidence (a streaming controller cannot tell
    the asked one), and its blocks include the asked needle's."""
    env = _passkey_env(tiny_model, keys=3, depth=0.5, length=640)
    item = env.items[0]
    env.reset(options={"row": item.row})
    needles = env.task.evidence(item)
    assert len(needles) == 3 and all(f"is {key}" in n for n, (_, key, _) in zip(needles, item.needles, strict=True))
    asked = _passkey_env(tiny_model, keys=3, depth=0.5, length=640, evidence="asked")
    asked.reset(options={"row": item.row})
    assert set(asked.evidence_blocks()) <= set(env.evidence_blocks())
    assert len(env.evidence_blocks()) >= 2  # needles at different depths
    with pytest.raises(ValueError, match="evidence must be one of"):
        _passkey_env(tiny_model, evidence="some")
    env.close()
    asked.close()


def test_several_keys_only_the_asked_needle(tiny_model):
    env = _passkey_env(tiny_model, keys=3, depth=0.5, length=640, evidence="asked")
    item = env.items[0]
    env.reset(options={"row": item.row})
    (needle,) = env.task.evidence(item)
    assert f"of {item.name} is {item.key}" in needle
    assert env.evidence_blocks() == _direct_blocks(env, item.row)
    context = env.task.context(item, [])
    other = next(k for name, k, _ in item.needles if name != item.name)
    assert other not in needle and other in context
    env.close()


def test_no_evidence_and_no_episode(tiny_model):
    env = make_env(tiny_model)  # HellaSwag: no evidence
    with pytest.raises(RuntimeError, match="before reset"):
        env.evidence_blocks()
    with pytest.raises(RuntimeError, match="before reset"):
        env.block_spans()
    env.reset(options={"row": ITEMS[3].row})
    assert env.task.evidence(env.episode_inputs(ITEMS[3].row)[0]) == []
    assert env.evidence_blocks() == []
    spans = env.block_spans()
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(end - start == 16 for start, end in spans[:-1])
    env.close()


def test_offsets_and_decoded_prefixes_agree(tiny_model):
    tokenizer = tiny_model[1]
    text = "There is a key. The pass key is 12345. Remember it.  "
    ids = tokenizer.encode(text.rstrip())
    assert tokenizer.is_fast
    assert token_char_spans(tokenizer, text, ids) == _decoded_spans(tokenizer, text, ids)
    with pytest.raises(ValueError, match="decode"):
        _decoded_spans(tokenizer, "something else entirely", ids)


def test_char_spans_and_overlap():
    text = "ab key cd key"
    assert evidence_char_spans(text, ["key"]) == [(3, 6), (10, 13)]
    with pytest.raises(ValueError, match="does not occur"):
        evidence_char_spans(text, ["lock"])
    with pytest.raises(ValueError, match="empty"):
        evidence_char_spans(text, [""])
    tokens = [(0, 2), (2, 3), (3, 6), (6, 7), (7, 9), (9, 10), (10, 13)]
    blocks = [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert overlapping_blocks(blocks, tokens, [(3, 6)]) == [1]
    assert overlapping_blocks(blocks, tokens, [(2, 3)]) == [0]  # touching a token's edge is no overlap
    assert overlapping_blocks(blocks, tokens, [(3, 6), (10, 13)]) == [1, 3]
    assert overlapping_blocks(blocks, tokens, []) == []
