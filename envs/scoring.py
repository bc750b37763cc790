"""Multiple-choice scoring exactly as lm-evaluation-harness does it for causal LMs.

Each ending is scored as the summed log-probability of the continuation ``" " + ending`` given the
prompt; ``acc`` takes the argmax, ``acc_norm`` the argmax after dividing by the ending's character
length (lm-eval ``api/task.py``: ``len(choice)`` of the ending *without* the delimiter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from envs.batched_forward import RowTokens, forward_rows, mask_dtype
from envs.cache_kwarg import with_cache
from quant.batched_cache import RowKVStore
from quant.kv_cache import MixedPrecisionKVCache

__all__ = [
    "encode_pair", "score_requests", "continuation_logprobs", "batched_continuation_logprobs", "can_pack",
    "choose", "EndingsRow", "PackedRow", "TARGET_DELIMITER", "CACHED_SCORING",
]

TARGET_DELIMITER = " "
#: How :func:`continuation_logprobs` lays out continuations against a cache of batch 1 (all of them in
#: one packed row). Stored references name it (envs.reference_store): the layout changes the float
#: noise of the scores, so entries scored another way are recomputed rather than mixed.
CACHED_SCORING = "packed-v1"


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: encode the pair jointly, then split at the context length.

    Joint encoding keeps the token boundary the tokenizer would really produce (e.g. " he" as one
    token); trailing context whitespace moves into the continuation for the same reason. Special
    tokens follow the tokenizer's own default, as lm-eval's HFLM does when ``add_bos_token`` is
    unset (SmolLM2 adds none).
    """
    if not context:
        raise ValueError("context must be non-empty (lm-eval substitutes a BOS token for empty contexts)")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return list(ctx), list(whole[len(ctx):])


def _gather_sums(logits: torch.Tensor, targets: list[list[int]], offsets: list[int]) -> list[float]:
    """Sum ``log_softmax(logits)[b, offsets[b] + j, targets[b][j]]`` over j for each row b.

    The log-softmax runs only over the positions that predict a target (not over padding or the
    context): it is computed row by row, so its values are the same as over the whole batch.
    """
    out = []
    for b, (tgt, off) in enumerate(zip(targets, offsets, strict=True)):
        logprobs = torch.log_softmax(logits[b, off : off + len(tgt)].float(), dim=-1)
        ids = torch.tensor(tgt, dtype=torch.long, device=logits.device)
        out.append(float(logprobs[torch.arange(len(tgt), device=logits.device), ids].sum()))
    return out


def _right_pad(rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _cache_batch(cache) -> int | None:
    """Batch size of a transformers cache, or None when it cannot be read (custom layouts)."""
    try:
        return int(cache.layers[0].keys.shape[0])
    except (AttributeError, IndexError, TypeError):
        return None


def _model_limit(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.inference_mode()
def score_requests(model, requests: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> list[float]:
    """Summed continuation log-probs for ``(context_ids, continuation_ids)`` pairs in one forward.

    Rows are ``context + continuation[:-1]`` right-padded; under causal attention the padding sits
    after every position that is read, so no attention mask is needed (lm-eval does the same).
    """
    if not requests:
        return []
    limit = _model_limit(model)
    rows, targets, offsets = [], [], []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation")
        row = list(ctx) + list(cont[:-1])
        if limit is not None and len(row) > limit:
            raise ValueError(f"request of {len(row) + 1} tokens exceeds the model's {limit} positions; use fewer shots")
        rows.append(row)
        targets.append(list(cont))
        offsets.append(len(ctx) - 1)
    device = next(model.parameters()).device
    inputs = _right_pad(rows, pad_id, device)
    # Only positions that predict continuation tokens need the (vocab-sized) LM head.
    start = min(offsets)
    keep = torch.arange(start, inputs.shape[1], device=device)
    logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits
    return _gather_sums(logits, targets, [o - start for o in offsets])


def can_pack(model) -> bool:
    """Whether continuations may be packed into one row against a cache (:func:`continuation_logprobs`).

    The packed row's 4D mask goes to every layer as it is, so a model with sliding-window or chunked
    layers (whose own masks would cut the prefix) must score one row per continuation instead."""
    config = getattr(model, "config", None)
    if config is None:
        return True
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    if any("sliding" in str(t) or "chunked" in str(t) for t in layer_types):
        return False
    return not (getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True))


@torch.inference_mode()
def continuation_logprobs(
    model,
    prefix_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    cache=None,
    prefix_last_logits: torch.Tensor | None = None,
    pad_id: int = 0,
) -> list[float]:
    """Summed log-prob of each continuation after a shared prefix.

    Without a cache the prefix is re-run per row (one forward, lm-eval's arithmetic). With
    ``cache`` already holding the prefix only continuation tokens are run: the first token's
    log-prob comes from ``prefix_last_logits`` (the logits at the prefix's last position, shape
    ``[V]``, ``[1, V]`` or ``[B, V]``) and the rest from one forward against the cache, which
    appends the continuation tokens to it (crop or discard it afterwards). The cache's batch says
    how: ``len(continuations)`` rows (the prefix expanded along the batch), one continuation per
    row, right-padded; or batch 1, every continuation packed into one row, each with its own
    positions and a block-diagonal causal mask over the new tokens (:data:`CACHED_SCORING`): no
    padding is computed and the prefix is read once instead of once per continuation. Packing
    needs :func:`can_pack`.
    """
    conts = [list(c) for c in continuations]
    if not conts or any(not c for c in conts):
        raise ValueError("continuations must be a non-empty list of non-empty token lists")
    if cache is None:
        return score_requests(model, [(list(prefix_ids), c) for c in conts], pad_id=pad_id)
    if prefix_last_logits is None:
        raise ValueError("prefix_last_logits is required with a cache (the cache has no logits)")

    scores = _first_token_scores(prefix_last_logits, conts)
    if all(len(c) == 1 for c in conts):
        return scores

    cache_batch = _cache_batch(cache)
    packed = cache_batch == 1 and len(conts) > 1
    if cache_batch is not None and not packed and cache_batch != len(conts):
        raise ValueError(f"cache batch is {cache_batch} but there are {len(conts)} continuations; "
                         "expand it to one row per continuation, or pass a batch of 1 to pack them")
    if packed and not can_pack(model):
        raise ValueError("this model has sliding-window or chunked attention layers, which a packed row's mask "
                         f"would override: expand the cache to {len(conts)} rows (one per continuation)")
    past = cache.get_seq_length()
    if past != len(prefix_ids):
        raise ValueError(f"cache holds {past} tokens but the prefix has {len(prefix_ids)}")
    rest = _packed_rest(model, cache, past, conts) if packed else _row_rest(model, cache, conts, pad_id)
    return [s + r for s, r in zip(scores, rest, strict=True)]


def _row_rest(model, cache, conts: list[list[int]], pad_id: int) -> list[float]:
    """Log-probs of every continuation's tokens after its first: one right-padded row each."""
    device = next(model.parameters()).device
    inputs = _right_pad([c[:-1] for c in conts], pad_id, device)
    logits = model(input_ids=inputs, **with_cache(model, cache), use_cache=True).logits
    return _gather_sums(logits, [c[1:] for c in conts], [0] * len(conts))


def _first_token_scores(prefix_last_logits: torch.Tensor, conts: list[list[int]]) -> list[float]:
    """Each continuation's first token's log-prob from the logits at the prefix's last position."""
    first = torch.log_softmax(prefix_last_logits.float().reshape(-1, prefix_last_logits.shape[-1]), dim=-1)
    if first.shape[0] not in (1, len(conts)):
        raise ValueError(f"prefix_last_logits has {first.shape[0]} rows; expected 1 or {len(conts)}")
    first_ids = torch.tensor([c[0] for c in conts], device=first.device)
    totals = first.expand(len(conts), -1)[torch.arange(len(conts), device=first.device), first_ids]
    return [float(t) for t in totals]


@dataclass(frozen=True)
class PackedRow:
    """Continuations' inputs ``c[:-1]`` side by side in one row (:data:`CACHED_SCORING`): each at positions
    ``past, past + 1, ...`` as if it alone followed the prefix, and each token seeing the prefix and the
    earlier tokens of its own continuation only."""

    ids: torch.Tensor  # [L] the inputs, continuation after continuation
    tokens: list[int]  # the same ids as a list
    local: torch.Tensor  # [L] each token's position after the prefix
    visible: torch.Tensor  # [L, L] bool: query token may see new token
    starts: list[int]  # where each continuation's inputs begin in the row
    targets: list[list[int]]  # what each continuation's inputs predict: ``c[1:]``

    @classmethod
    def of(cls, conts: list[list[int]], device) -> PackedRow:
        pieces = [c[:-1] for c in conts]
        lengths = torch.tensor([len(p) for p in pieces], device=device)
        tokens = [t for p in pieces for t in p]
        ids = torch.tensor(tokens, dtype=torch.long, device=device)
        starts = torch.cumsum(lengths, 0) - lengths
        segment = torch.repeat_interleave(torch.arange(len(pieces), device=device), lengths)
        local = torch.arange(len(ids), device=device) - starts[segment]
        visible = (segment[:, None] == segment[None, :]) & (local[:, None] >= local[None, :])
        return cls(ids, tokens, local, visible, starts.tolist(), [c[1:] for c in conts])

    def sums(self, logits: torch.Tensor) -> list[float]:
        """Each continuation's summed target log-probs from the row's ``[L', V]`` logits (``L' >= L``)."""
        return _gather_sums(logits.unsqueeze(0).expand(len(self.starts), -1, -1), self.targets, self.starts)


def _packed_rest(model, cache, past: int, conts: list[list[int]]) -> list[float]:
    """Log-probs of every continuation's tokens after its first, all continuations in one row
    (:class:`PackedRow`). The mask is additive (0 or the dtype's minimum), which eager and SDPA
    attention both read."""
    device = next(model.parameters()).device
    row = PackedRow.of(conts, device)
    n = len(row.ids)
    dtype = mask_dtype(model)
    mask = torch.zeros(1, 1, n, past + n, dtype=dtype, device=device)
    mask[0, 0, :, past:].masked_fill_(~row.visible, torch.finfo(dtype).min)
    logits = model(
        input_ids=row.ids.unsqueeze(0), position_ids=(past + row.local).unsqueeze(0), attention_mask=mask,
        **with_cache(model, cache), use_cache=True,
    ).logits
    return row.sums(logits[0])


@torch.inference_mode()
def batched_continuation_logprobs(
    model,
    caches: Sequence[MixedPrecisionKVCache],
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    prefix_last_logits: Sequence[torch.Tensor],
    store: RowKVStore | None = None,
    slots: Sequence[int] | None = None,
) -> list[list[float]]:
    """:func:`continuation_logprobs` for several prefixes at once, each against its own cache (batch 1,
    holding that prefix), in ONE forward. ``store`` and ``slots``: the caches keep their floats in rows
    ``slots`` of ``store`` (:class:`~quant.batched_cache.BatchedKVCache` reads them in place).

    Why: the batched vector env ends several episodes in the same step, and scoring each row's endings
    in a forward of its own made a step of N rows cost up to N + 1 forwards. Each row's continuations
    are packed into its row as for one cache (:class:`EndingsRow`, :data:`CACHED_SCORING`), the rows
    right-padded (:func:`envs.batched_forward.forward_rows`), each with its own positions and mask. The
    caches get the continuation tokens appended, as with one cache (branch or discard afterwards). Scores
    equal the row-by-row ones up to the float noise of a padded batch.
    """
    if not (len(caches) == len(prefixes) == len(continuations) == len(prefix_last_logits)) or not caches:
        raise ValueError("need one cache, prefix, list of continuations and last logits per row")
    if not can_pack(model):
        raise ValueError("this model has sliding-window or chunked attention layers, which a packed row's mask "
                         "would override: score the rows one by one (continuation_logprobs)")
    for cache, prefix in zip(caches, prefixes, strict=True):
        if cache.get_seq_length() != len(prefix):
            raise ValueError(f"a cache holds {cache.get_seq_length()} tokens but its prefix has {len(prefix)}")
    device = next(model.parameters()).device
    rows = [EndingsRow.of(last, conts, device) for last, conts in zip(prefix_last_logits, continuations, strict=True)]
    if not any(row.tokens.ids for row in rows):
        return [row.first for row in rows]
    logits = forward_rows(model, caches, [row.tokens for row in rows], store, slots).logits
    return [row.scores(logits[r]) for r, row in enumerate(rows)]


@dataclass(frozen=True)
class EndingsRow:
    """One row's endings to score in a forward shared with other rows: each ending's first token scored from
    the logits at the prompt's last position, the rest packed into the row (:class:`PackedRow`; no token when
    every ending is one token long). The model must allow packing (:func:`can_pack`): the caller checks it."""

    first: list[float]  # each ending's first token's log-prob
    packed: PackedRow | None

    @classmethod
    def of(cls, prefix_last_logits: torch.Tensor, continuations: Sequence[Sequence[int]], device) -> EndingsRow:
        conts = [list(c) for c in continuations]
        if not conts or any(not c for c in conts):
            raise ValueError("every row needs a non-empty list of non-empty continuations")
        packed = PackedRow.of(conts, device) if any(len(c) > 1 for c in conts) else None
        return cls(_first_token_scores(prefix_last_logits, conts), packed)

    @property
    def tokens(self) -> RowTokens:
        """The row's new tokens in the shared forward (none: it sits out)."""
        if self.packed is None:
            return RowTokens([])
        return RowTokens(self.packed.tokens, self.packed.local, self.packed.visible)

    def scores(self, logits: torch.Tensor | None) -> list[float]:
        """Each ending's summed log-prob, from the row's logits in the shared forward (``[L', V]``; None where
        the row had no token to run)."""
        if self.packed is None:
            return list(self.first)
        return [s + t for s, t in zip(self.first, self.packed.sums(logits), strict=True)]


def choose(scores: Sequence[float], endings: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of log-likelihood, and of log-likelihood per ending character.

    Ties go to the first ending (``np.argmax``), as in lm-eval.
    """
    if len(scores) != len(endings) or not scores:
        raise ValueError(f"need one score per ending, got {len(scores)} scores for {len(endings)} endings")
    lls = np.asarray(scores, dtype=np.float64)
    lengths = np.array([float(len(e)) for e in endings])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))
