"""Where a task's evidence lies in a tokenized prompt: evidence strings -> character spans -> blocks.

A task names the substrings of its prompt that carry the answer (``Task.evidence``); the env cuts the
*tokens* of the prompt into blocks. This module maps one to the other so that the env can say which
blocks hold evidence (``KVPrecisionEnv.evidence_blocks``), the privileged signal of the evidence
teacher (``agents.evidence``).

Why offsets first and decoded prefixes second: a fast tokenizer's offset mapping says exactly which
characters each token covers; a slow tokenizer has none, so the character end of token ``i`` is
taken as the length of the decoded prefix ``ids[:i + 1]`` (exact for byte-level BPE on text whose
characters are whole tokens or sequences of them). Either way the result is checked: the offsets must
come from the same ids the env uses, and the decoded prefixes must rebuild the text, else a clear error
rather than a silently wrong block.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["evidence_char_spans", "token_char_spans", "overlapping_blocks", "overlapping_tokens"]


def evidence_char_spans(text: str, evidence: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, end)`` character spans of every occurrence of every evidence string in ``text``.

    An evidence string that does not occur in ``text`` is an error: the task and the prompt disagree."""
    spans: list[tuple[int, int]] = []
    for piece in evidence:
        if not piece:
            raise ValueError("an evidence string is empty; a task's evidence must be non-empty substrings of its prompt")
        start = text.find(piece)
        if start < 0:
            raise ValueError(f"evidence {piece[:60]!r} does not occur in the prompt; Task.evidence must return "
                             "substrings of Task.context")
        while start >= 0:
            spans.append((start, start + len(piece)))
            start = text.find(piece, start + 1)
    return sorted(spans)


def token_char_spans(tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` characters of ``text`` that each token of ``ids`` (``tokenizer.encode`` of a prefix
    of ``text``, as ``envs.scoring.encode_pair`` makes the prompt) covers; special tokens cover none."""
    ids = list(ids)
    if getattr(tokenizer, "is_fast", False):
        # the prompt ids encode the context without its trailing whitespace (encode_pair moves it on)
        encoded = tokenizer(text.rstrip(), return_offsets_mapping=True)
        if list(encoded["input_ids"]) == ids:
            return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    return _decoded_spans(tokenizer, text, ids)


def _decoded_spans(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Token spans from the lengths of decoded prefixes (tokenizers without offsets)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    spans: list[tuple[int, int]] = []
    end = 0
    for i, token in enumerate(ids):
        if token in special:
            spans.append((end, end))
            continue
        decoded = tokenizer.decode(ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        new_end = max(end, len(decoded))
        spans.append((end, new_end))
        end = new_end
    rebuilt = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if not text.startswith(rebuilt):
        raise ValueError("the tokenizer does not decode the prompt ids back to the prompt text and has no offset "
                         "mapping; evidence cannot be located in its tokens (use a fast tokenizer)")
    return spans


def overlapping_blocks(
    blocks: Sequence[tuple[int, int]], token_spans: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Indices of the ``[start, end)`` token blocks holding a token whose characters overlap any of
    ``char_spans`` (see :func:`overlapping_tokens`)."""
    hit = overlapping_tokens(token_spans, char_spans)
    return [b for b, (start, end) in enumerate(blocks) if any(hit[start:end])]


def overlapping_tokens(token_spans: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: whether its characters overlap any of ``char_spans`` (they share at least one character)."""
    return [any(ts < ce and cs < te for cs, ce in char_spans) for ts, te in token_spans]
