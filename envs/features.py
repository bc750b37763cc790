"""Observation features: per-token signals summarised per block, plus episode-state features.

A feature is one class registered by name (``@register_feature("entropy")``). Token features
return one value per token of the block just run and declare how they are summarised
(``summaries = ("mean", "max")``), which gives observation entries ``entropy_mean``,
``entropy_max``. State features return a single value under their own name. Every entry is
documented with its unit and range so observations stay roughly unit-scaled without hidden
normalisation.

Features declare what they ``needs`` from the forward pass (attention maps, input gradients), so
the environment only pays for what the chosen features use.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from envs.settings import FULL_BITS  # noqa: F401  (re-exported: the unit of bit-valued features)
from quant.registry import Registry

FEATURES: Registry[Feature] = Registry("feature")
register_feature = FEATURES.register

_SUMMARIES = {
    "mean": lambda x: x.mean(),
    "max": lambda x: x.max(),
    "min": lambda x: x.min(),
    "std": lambda x: x.std(unbiased=False),
}


class RunningFrequency:
    """Token counts of the episode so far, for the online rarity measure of the seeds."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def observe(self, token_ids: Sequence[int]) -> list[float]:
        """Count each token as it arrives and return ``-log(count / total)`` at that moment."""
        out = []
        for tok in token_ids:
            self.counts[tok] = self.counts.get(tok, 0) + 1
            self.total += 1
            out.append(-math.log(self.counts[tok] / self.total))
        return out


class TokenVocabulary:
    """Per-token-id facts about the tokenizer's vocabulary that content features read (``needs`` "vocab").

    Why a mask over ids and not the text: a feature sees only the block's token ids; deciding once per
    tokenizer which ids spell a digit makes ``digits`` a lookup. Each id is *decoded* (not read off
    the vocabulary's token strings): SentencePiece byte-fallback tokens are spelled ``<0x31>``, which
    holds digits that the text does not.
    """

    def __init__(
        self, digit: torch.Tensor, capital: torch.Tensor | None = None, word_start: torch.Tensor | None = None,
        punct: torch.Tensor | None = None,
    ):
        self.digit = digit  # [vocab] bool: the token's decoded text holds a decimal digit
        # [vocab] bool each (all False when not given): the text's first non-space character is an
        # upper-case letter; the text starts a word (a leading space or newline); the text is punctuation only
        self.capital = torch.zeros_like(digit) if capital is None else capital
        self.word_start = torch.zeros_like(digit) if word_start is None else word_start
        self.punct = torch.zeros_like(digit) if punct is None else punct

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> TokenVocabulary:
        """The facts of a vocabulary whose id ``i`` decodes to ``texts[i]``."""

        def mask(test) -> torch.Tensor:
            return torch.tensor([bool(test(t)) for t in texts], dtype=torch.bool)

        return cls(
            digit=mask(lambda t: any(c.isdigit() for c in t)),
            capital=mask(lambda t: t.strip()[:1].isupper()),
            word_start=mask(lambda t: t[:1] in (" ", "\n")),
            punct=mask(lambda t: t.strip() and not any(c.isalnum() for c in t)),
        )

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenVocabulary:
        """The tokenizer's vocabulary facts, computed once per tokenizer object (about a second for 50k ids)."""
        try:
            cached = _VOCABULARIES.get(tokenizer)
        except TypeError:  # not weak-referenceable: compute without the cache
            cached, cacheable = None, False
        else:
            cacheable = True
        if cached is not None:
            return cached
        vocab = cls.from_texts(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
        if cacheable:
            _VOCABULARIES[tokenizer] = vocab
        return vocab


_VOCABULARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class EpisodeState:
    """What state features read: where the episode is and what the cache holds."""

    block_index: int  # index of the block just run (0-based)
    n_blocks: int
    avg_bits: float  # token-weighted average of committed bits (16 before any commit)
    kv_ratio: float  # committed KV bytes / fp16 bytes of the same tokens (1 before any commit)
    last_bits: int | float  # bits per K/V element of the last committed block, keys and values by
    # their share, over layers (K4V2: 3); 16 before any commit
    max_bits: int = FULL_BITS  # the unit of avg_bits/last_bits (see FULL_BITS)
    block_start: int = 0  # sequence position of the block's first token
    sink_tokens: int = 0  # the cache keeps the sequence's first this many tokens in fp16 (EnvConfig.sink_tokens)

    @classmethod
    def from_cache(cls, cache, block_index: int, n_blocks: int, block_start: int = 0) -> EpisodeState:
        """Read the state off a ``MixedPrecisionKVCache`` (the env and controller-driven generation share this)."""
        committed = bool(cache.block_bits)
        return cls(
            block_index=block_index,
            n_blocks=n_blocks,
            avg_bits=cache.average_bits() if committed else float(FULL_BITS),
            kv_ratio=cache.nbytes(False) / cache.fp16_nbytes(False) if committed else 1.0,
            last_bits=cache.block_bits[-1][0] if committed else FULL_BITS,
            block_start=block_start,
            sink_tokens=getattr(cache, "sink_tokens", 0),  # caches without fp16 sinks have none
        )


class LogitStats:
    """Next-token statistics of one or more blocks' logits stacked ``[T, vocab]``, with their next tokens
    ``targets`` ``[T]`` (-1 where unknown), each computed on first read in one pass over all of them.

    Why stacked: the rows of a batched forward whose logits lie back to back share one (``envs.vector``), so on
    a GPU a step issues these ops once, not once per row. A :class:`BlockContext` reads its own tokens' slice
    (``BlockContext.logit_stats``), or, alone, builds one over its own logits."""

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor):
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} need one target per position, got {tuple(targets.shape)}")
        self.logits, self.targets = logits, targets

    @cached_property
    def softmax_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(shifted, exp(shifted), log Z)`` with ``shifted = logits - max``: the one pass over the
        [T, vocab] logits that entropy and the target log-probs share. Materialising a full
        ``log_softmax`` (and exponentiating it again for the entropy) cost twice as much."""
        x = self.logits.float()
        shifted = x - x.amax(dim=-1, keepdim=True)
        exp = shifted.exp()
        return shifted, exp, exp.sum(-1).log()

    @cached_property
    def log_probs(self) -> torch.Tensor:
        """Full [T, V] next-token log-probs (built-in features avoid it; custom ones may read it)."""
        shifted, _, log_z = self.softmax_parts
        return shifted - log_z.unsqueeze(-1)

    @cached_property
    def entropy(self) -> torch.Tensor:
        """[T] next-token entropy in nats: ``log Z - sum(p * shifted)``, the dot product as one bmm."""
        shifted, exp, log_z = self.softmax_parts
        dot = torch.bmm(exp.unsqueeze(1), shifted.unsqueeze(2)).view(-1)
        return log_z - dot / log_z.exp()

    @cached_property
    def target_log_probs(self) -> torch.Tensor:
        """[T] log p(next token) at every position; meaningless where the target is unknown (-1)."""
        shifted, _, log_z = self.softmax_parts
        # gather, not ``shifted[mask]``: that would copy the whole [T', vocab] rows to pick one each
        return shifted.gather(-1, self.targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) - log_z


@dataclass
class BlockContext:
    """Everything a feature may read about the block just run through the model."""

    token_ids: torch.Tensor  # [T] tokens of the block
    logits: torch.Tensor  # [T, V] next-token logits at each position
    targets: torch.Tensor  # [T] the actual next token (-1 where unknown: the prompt's last token)
    state: EpisodeState
    frequency: RunningFrequency = field(default_factory=RunningFrequency)
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer [1, heads, T, S]
    saliency: torch.Tensor | None = None  # [T] |d max log-prob / d embedding|
    cache: Any = None  # the MixedPrecisionKVCache whose pending buffer holds this block's keys/values
    forward_seconds: float = 0.0
    # last, so positional construction stays as it was: token ids seen in the episode before this block
    # (the observer's set; ``novelty`` adds the block's)
    seen: set[int] = field(default_factory=set)
    vocab: TokenVocabulary | None = None  # the tokenizer's per-id facts, for features that need "vocab"
    # per-token values a batched forward computed for all its rows at once (name -> [T]): the properties of
    # the same name return them instead of computing them from this block's own maps (envs.vector)
    batch_values: dict[str, torch.Tensor] = field(default_factory=dict)
    # (stats, offset): LogitStats over several blocks' logits, this block's at rows offset.. offset + T of them
    # (a batched forward's rows, envs.vector); None: the block's own, built when first read
    logit_stats: tuple[LogitStats, int] | None = None

    @cached_property
    def _stats(self) -> tuple[LogitStats, slice | None]:
        """The :class:`LogitStats` this block reads, and its slice of them (None: they are all its own)."""
        if self.logit_stats is None:
            return LogitStats(self.logits, self.targets), None
        stats, offset = self.logit_stats
        t = len(self.logits)
        return stats, None if offset == 0 and t == len(stats.targets) else slice(offset, offset + t)

    def _own(self, name: str) -> torch.Tensor:
        stats, part = self._stats
        values = getattr(stats, name)
        return values if part is None else values[part]

    @cached_property
    def log_probs(self) -> torch.Tensor:
        """Full [T, V] next-token log-probs (built-in features avoid it; custom ones may read it)."""
        return self._own("log_probs")

    @cached_property
    def entropy(self) -> torch.Tensor:
        """[T] next-token entropy in nats (:attr:`LogitStats.entropy`)."""
        return self._own("entropy")

    @cached_property
    def head_variance(self) -> torch.Tensor:
        """[T] per token: the variance across heads of its attention weights, summed over keys, averaged over
        layers (:func:`head_variance`)."""
        if "head_variance" in self.batch_values:
            return self.batch_values["head_variance"]
        if self.attentions is None:
            raise RuntimeError("attn_var needs attention maps: run the model with output_attentions=True")
        return head_variance(self.attentions)[0]

    @cached_property
    def received_attention(self) -> torch.Tensor:
        """[T - 1] attention each of the block's tokens (but its last) receives from the block's *later*
        tokens, relative to uniform attention (H2O's heavy hitters, ZipCache's normalised attention).

        Query ``i`` of the block sees ``S - T + i + 1`` keys (causal), so uniform attention gives each
        key ``1 / keys_i``; ``A[i, j] * keys_i`` is 1 for a key that gets its fair share, and the
        average over the later queries ``i > j`` (the diagonal excluded: a token's attention to itself
        says nothing about its use by others) and over heads and layers is comparable across token
        positions (each token has ``T - 1 - j`` later queries) and across blocks (later blocks spread
        attention over more keys). The block's last token has no later query and is left out.
        The block's keys are the last ``T`` columns of every map (the env's and generation's alike).
        """
        if self.attentions is None:
            raise RuntimeError("received attention needs attention maps: run the model with output_attentions=True")
        t = len(self.token_ids)
        keys_seen = self.attentions[0].shape[-1]
        if keys_seen < t:
            raise ValueError(f"attention maps over {keys_seen} keys cannot hold the block's {t} tokens")
        block = None  # [T queries, T keys of the block], summed over heads and layers
        for a in self.attentions:
            part = a[0, :, :, keys_seen - t :].float().sum(dim=0)
            block = part if block is None else block.add_(part)
        heads = self.attentions[0].shape[1]
        block = block / (heads * len(self.attentions))
        idx = torch.arange(t, device=block.device)
        keys_per_query = (keys_seen - t + idx + 1).to(block.dtype)
        later = idx.unsqueeze(1) > idx.unsqueeze(0)  # [query i, key j]: i > j
        received = (block * keys_per_query.unsqueeze(1) * later).sum(dim=0)
        return (received[: t - 1] / (t - 1 - idx[: t - 1]).to(block.dtype)).cpu()

    @cached_property
    def target_mask(self) -> torch.Tensor:
        return self.targets >= 0

    @cached_property
    def target_log_probs(self) -> torch.Tensor:
        """log p(actual next token) at each position with a known target ([T'] <= [T])."""
        return self._own("target_log_probs")[self.target_mask]


def head_variance(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, T] per query: the variance across heads of its attention weights, summed over keys, averaged over
    layers; ``attentions`` per layer [B, heads, T, S]. Keys a query cannot see weigh 0 in every head, so a
    batch padded to its longest row gives each row what its own maps give.

    Centred sum of squares rather than Tensor.var: on CPU, var over the heads dim of a map takes a slow
    strided path, ~20x slower than these two passes. One pass per layer serves every row of a batch."""
    total = None
    for a in attentions:
        x = a if a.dtype == torch.float32 else a.float()
        dev = (x - x.mean(dim=1, keepdim=True)).square_().sum(dim=3).sum(dim=1)  # keys first: ~20% faster on CPU
        total = dev if total is None else total.add_(dev)
    return total / (attentions[0].shape[1] * len(attentions))


class Feature:
    """Base class. ``per_token`` features are summarised; state features return one number."""

    name: str = ""
    per_token: bool = True
    summaries: tuple[str, ...] = ("mean",)
    deterministic: bool = True
    needs: frozenset[str] = frozenset()  # subset of {"attentions", "saliency", "cache", "vocab"}
    doc: str = ""  # unit and range, shown in the observation table
    high: float = 1.0  # upper bound of every entry (all features are >= 0)

    def compute(self, ctx: BlockContext) -> torch.Tensor | float:
        raise NotImplementedError

    def observation_names(self) -> list[str]:
        return [f"{self.name}_{s}" for s in self.summaries] if self.per_token else [self.name]

    def observe(self, ctx: BlockContext) -> list[float]:
        return self.summarise(self.compute(ctx))

    def summarise(self, value: torch.Tensor | float) -> list[float]:
        """The observation entries of a computed value: the summaries of a per-token one, else the value."""
        return [float(v) for v in self.summary_values(value)]

    def summary_values(self, value: torch.Tensor | float) -> list[torch.Tensor | float]:
        """:meth:`summarise` before reading the numbers: 0-d tensors where a per-token value is a tensor, so
        a :class:`FeatureSet` reads all of a block's at once (one device-to-host copy, not one per entry)."""
        if not self.per_token:
            return [value]
        value = torch.as_tensor(value, dtype=torch.float32)
        if value.numel() == 0:
            return [0.0] * len(self.summaries)
        return [_SUMMARIES[s](value) for s in self.summaries]


@register_feature("entropy")
class Entropy(Feature):
    summaries = ("mean", "max")
    high = 20.0  # >= log(vocab) for any vocabulary below 4e8
    doc = "next-token entropy in nats (0 .. log vocab, typically 0-6)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        return ctx.entropy


@register_feature("rarity")
class Rarity(Feature):
    summaries = ("mean", "max")
    high = 20.0
    doc = "-log running frequency of the token in the episode, nats (0 .. log tokens so far)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        return torch.tensor(ctx.frequency.observe(ctx.token_ids.tolist()))


class _VocabularyMask(Feature):
    """A per-token 0/1 fact read off the tokenizer's vocabulary (:class:`TokenVocabulary`)."""

    summaries = ("mean",)
    needs = frozenset({"vocab"})
    mask_name = ""

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        if ctx.vocab is None:
            raise RuntimeError(f"{self.name} needs the tokenizer's vocabulary (BlockContext.vocab)")
        return getattr(ctx.vocab, self.mask_name)[ctx.token_ids.cpu()].float()


@register_feature("digits")
class Digits(_VocabularyMask):
    """Whether each token spells a decimal digit: where a number (a pass key, a date, a quantity) sits.

    Why: on retrieval tasks the answer is often a number in otherwise digit-free text, and the block
    holding it is the one low bits must not touch (issue 15). The mean is the block's digit density,
    the max whether it holds any digit at all.
    """

    summaries = ("mean", "max")
    mask_name = "digit"
    doc = "1 if the token's text holds a decimal digit, else 0 (mean: the block's share of digit tokens; 0 .. 1)"


@register_feature("capital")
class Capital(_VocabularyMask):
    """Whether each token starts with an upper-case letter: names, sentence starts, the labels of a key
    ("The pass key is"); with ``digits`` what a per-token selector reads (issue 15)."""

    mask_name = "capital"
    doc = "1 if the token's text starts with an upper-case letter, else 0 (mean: share; 0 .. 1)"


@register_feature("word_start")
class WordStart(_VocabularyMask):
    """Whether each token starts a word (a leading space or newline): separates a number's first piece
    from its continuation pieces."""

    mask_name = "word_start"
    doc = "1 if the token's text starts with a space or newline, else 0 (mean: share; 0 .. 1)"


@register_feature("punct")
class Punctuation(_VocabularyMask):
    """Whether each token is punctuation only (sentence and clause boundaries)."""

    mask_name = "punct"
    doc = "1 if the token's text is punctuation only (no letter or digit), else 0 (mean: share; 0 .. 1)"


@register_feature("token_rank")
class TokenRank(Feature):
    """The token's id on a log scale: BPE ids grow as merges get rarer, so a static rarity that needs no
    counting (unlike ``rarity``, which depends on what the episode has shown so far)."""

    summaries = ("mean",)
    doc = "log(1 + token id) / log(vocab size) (0 .. 1)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        vocab = ctx.logits.shape[-1]
        return torch.log1p(ctx.token_ids.cpu().double()).float() / math.log(max(vocab, 2))


@register_feature("novelty")
class Novelty(Feature):
    """Whether each token occurs for the first time in the episode (earlier tokens of its block count).

    Unlike ``rarity`` (``-log`` of the running frequency, which grows with the tokens seen so far and
    is high for any token seen only a few times), this is a plain 0/1 per token, so the block's mean is
    the share of tokens it introduces, comparable at every position: a needle (new words, new digits)
    in a haystack of already-seen function words stands out.
    """

    summaries = ("mean",)
    doc = "1 if the token was not seen earlier in the episode, else 0 (mean: share of new tokens; 0 .. 1)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        out = []
        for tok in ctx.token_ids.tolist():
            out.append(0.0 if tok in ctx.seen else 1.0)
            ctx.seen.add(tok)
        return torch.tensor(out)


@register_feature("attn_var")
class AttentionVariance(Feature):
    summaries = ("mean",)
    needs = frozenset({"attentions"})
    doc = "variance across heads of the attention weights, summed over keys, mean over layers (0 .. 1)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        return ctx.head_variance


@register_feature("token_acc")
class TokenAccuracy(Feature):
    summaries = ("mean", "min")
    doc = "probability of the actual next token (0 .. 1)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        return ctx.target_log_probs.exp()


@register_feature("latency")
class Latency(Feature):
    """Measured forward time per token; off by default because it makes observations nondeterministic."""

    summaries = ("mean",)
    deterministic = False
    high = 1e4
    doc = "forward wall time per token in ms"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        ms = 1000.0 * ctx.forward_seconds / max(len(ctx.token_ids), 1)
        return torch.full((len(ctx.token_ids),), ms)


@register_feature("saliency")
class Saliency(Feature):
    """Gradient of the top next-token log-prob w.r.t. the input embeddings: off by default (a backward pass)."""

    summaries = ("mean", "max")
    needs = frozenset({"saliency"})
    high = 1e4
    doc = "L2 norm of d(max log-prob)/d(input embedding) per token (model dependent, ~0-1)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        if ctx.saliency is None:
            raise RuntimeError("saliency needs the environment to compute input gradients")
        return ctx.saliency


@register_feature("kv_error")
class KVError(Feature):
    """What committing the block at 2 bits would do to its keys and values, measured before deciding.

    Entropy and the other token features describe the *text*; this one describes the *numbers*: a
    block holding an outlier token (the attention sink, a delimiter with massive activations) has
    wide per-channel key ranges, and at 2 bits every neighbour of that token is crushed to one or
    two levels; the text features cannot see that. Measured on SmolLM2 it did *not* predict which
    blocks 2 bits damage (Spearman ~0 on pool items, README "What the study tried"), so it is off by
    default: kept for models whose outliers do matter.
    """

    summaries = ("mean", "max")
    needs = frozenset({"cache"})
    bits = 2  # the cheapest width of the default menu: the one whose damage the policy must judge
    high = 1e3
    doc = "squared 2-bit reconstruction error of the token's K and V / the block's mean squared norm, mean over layers (0 .. ~1)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        if ctx.cache is None:
            raise RuntimeError("kv_error needs the cache holding the block's pending keys/values")
        return ctx.cache.pending_error(self.bits)


@register_feature("recv_attn")
class ReceivedAttention(Feature):
    """Attention the block's later tokens pay to each of its tokens (H2O / ZipCache's signal).

    Tokens the model keeps reading (heavy hitters: the attention sink, delimiters, the question's key
    words) are where quantization error propagates into every later step; a block whose tokens
    receive little attention can be stored coarsely. See :attr:`BlockContext.received_attention`
    for the normalisation (1 = uniform attention). The mean says how much the block is read, the
    max whether it holds a heavy hitter. Only the block's own later tokens are seen (later blocks and
    the endings do not exist yet when the block is decided); on SmolLM2 this did not rank per-block
    damage after block 0 (README), so it is off by default.
    """

    summaries = ("mean", "max")
    needs = frozenset({"attentions"})
    high = 1e6  # at most the key count (all of every later query's attention on one token)
    doc = ("attention from the block's later tokens to each token, x the keys each query sees (1 = uniform), "
           "mean over later queries, heads and layers (0 .. keys; typically 0-10)")

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        return ctx.received_attention


@register_feature("attn_kv_error")
class AttentionWeightedKVError(Feature):
    """The block's low-bit reconstruction error where it is read: ``kv_error`` x ``recv_attn`` per token.

    ``kv_error`` alone did not predict damage on SmolLM2 (README): an error on a token nobody attends
    to is harmless; the same error on a heavy hitter reaches every later query. Both per-token signals
    share the block's last token's exclusion (it has no later query inside the block).
    """

    summaries = ("mean", "max")
    needs = frozenset({"attentions", "cache"})
    bits = KVError.bits  # the cheapest width of the default menu, as kv_error
    high = 1e9
    doc = f"{KVError.bits}-bit kv_error of each token x its recv_attn (0 .. ~10)"

    def compute(self, ctx: BlockContext) -> torch.Tensor:
        if ctx.cache is None:
            raise RuntimeError("attn_kv_error needs the cache holding the block's pending keys/values")
        received = ctx.received_attention
        error = ctx.cache.pending_error(self.bits)[: len(received)].to(received.device)
        return error * received


@register_feature("sink")
class SinkShare(Feature):
    """Share of the block's tokens that the cache keeps in fp16 as sink tokens (EnvConfig.sink_tokens).

    Those tokens cost 16 bits whatever the block's setting and take no quantization damage, so the
    block's setting matters less; 0 for every block after the sinks and for envs without sinks.
    """

    per_token = False
    doc = "fraction of the block's tokens among the sequence's first sink_tokens (fp16) (0 .. 1)"

    def compute(self, ctx: BlockContext) -> float:
        t = len(ctx.token_ids)
        sinks = min(max(ctx.state.sink_tokens - ctx.state.block_start, 0), t)
        return sinks / t if t else 0.0


@register_feature("blocks_left")
class BlocksLeft(Feature):
    """Position counted from the end: a block's error reaches every later block and the endings, so how
    many blocks still follow says how far it propagates, the same way in prompts of any length."""

    per_token = False
    doc = "prompt blocks still to run after this one / blocks in the prompt (0 at the last block .. <1)"

    def compute(self, ctx: BlockContext) -> float:
        return (ctx.state.n_blocks - 1 - ctx.state.block_index) / ctx.state.n_blocks


@register_feature("progress")
class Progress(Feature):
    per_token = False
    doc = "fraction of prompt blocks run so far (0 .. 1)"

    def compute(self, ctx: BlockContext) -> float:
        return (ctx.state.block_index + 1) / ctx.state.n_blocks


@register_feature("avg_bits")
class AverageBits(Feature):
    per_token = False
    doc = "token-weighted average committed bits / 16 (1 before any commit)"

    def compute(self, ctx: BlockContext) -> float:
        return ctx.state.avg_bits / ctx.state.max_bits


@register_feature("kv_ratio")
class KVRatio(Feature):
    per_token = False
    # Usually < 1, but each quantization group also stores an fp16 scale and zero-point (4 bytes), so
    # blocks shorter than a key group cost more than fp16: at most (1 + 4) / 2 bytes per element at
    # 8 bits with one-element groups, i.e. a ratio of 2.5. The bound keeps every observation in the Box.
    high = 2.5
    doc = "committed KV bytes / fp16 bytes of the same tokens (1 before any commit; > 1 only for very short blocks)"

    def compute(self, ctx: BlockContext) -> float:
        return ctx.state.kv_ratio


@register_feature("last_bits")
class LastBits(Feature):
    per_token = False
    doc = "bits of the last committed block (keys and values by share, over layers) / 16 (1 before any commit)"

    def compute(self, ctx: BlockContext) -> float:
        return ctx.state.last_bits / ctx.state.max_bits


def _read(values: Sequence[torch.Tensor | float]) -> list[float]:
    """``values`` as floats, the tensors among them read with one copy per device rather than one each
    (on a GPU every ``float(t)`` waits for the device)."""
    def batched(v) -> bool:  # the summaries of per-token features: 0-d float32 tensors
        return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32

    out: list[float | None] = [None if batched(v) else float(v) for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if batched(v):
            by_device.setdefault(v.device, []).append(i)
    for positions in by_device.values():
        read = torch.stack([values[i] for i in positions]).tolist()
        for i, x in zip(positions, read, strict=True):
            out[i] = x
    return out


DEFAULT_FEATURES: tuple[str, ...] = (
    "entropy",
    "rarity",
    "attn_var",
    "token_acc",
    "progress",
    "avg_bits",
    "kv_ratio",
    "last_bits",
)


class FeatureSet:
    """The chosen features, in order: builds the observation vector and its names.

    ``names``: features whose block summaries (or state values) come first. ``token_features``: per-token
    features also exposed token by token, ``slots`` entries each (``digits@0 .. digits@63``: the value of
    the block's token ``i``, 0 past the block's end), for a policy that chooses tokens, not only a
    setting (the env's ``protect_bits``). A feature in both lists is computed once per block."""

    def __init__(self, names: Sequence[str] = DEFAULT_FEATURES, token_features: Sequence[str] = (), slots: int = 0):
        if not names:
            raise ValueError("at least one feature is needed")
        for what, group in (("feature", names), ("token feature", token_features)):
            if len(set(group)) != len(group):
                raise ValueError(f"duplicate {what} names in {list(group)}")
        if token_features and slots < 1:
            raise ValueError(f"token features need slots >= 1 (tokens per block), got {slots}")
        self.features = [FEATURES.get(n)() for n in names]
        self.token_features = [FEATURES.get(n)() for n in token_features]
        flat = [f.name for f in self.token_features if not f.per_token]
        if flat:
            raise ValueError(f"token features must be per-token features; {flat} give one value per block")
        self.slots = slots if token_features else 0
        self.observation_names: tuple[str, ...] = tuple(
            entry for f in self.features for entry in f.observation_names()
        ) + tuple(f"{f.name}@{i}" for f in self.token_features for i in range(self.slots))
        everything = self.features + self.token_features
        self.needs: frozenset[str] = frozenset().union(*(f.needs for f in everything))
        self.deterministic = all(f.deterministic for f in everything)

    def __len__(self) -> int:
        return len(self.observation_names)

    def observe(self, ctx: BlockContext) -> list[float]:
        computed: dict[str, Any] = {}  # once per feature: rarity and novelty count what they see

        def value(f: Feature):
            if f.name not in computed:
                computed[f.name] = f.compute(ctx)
            return computed[f.name]

        out = _read([v for f in self.features for v in f.summary_values(value(f))])
        for f in self.token_features:
            per_token = torch.as_tensor(value(f), dtype=torch.float32).reshape(-1)[: self.slots]
            out.extend(per_token.tolist() + [0.0] * (self.slots - len(per_token)))
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Observation-space bounds from each feature's declared range."""
        high = [f.high for f in self.features for _ in f.observation_names()]
        high += [f.high for f in self.token_features for _ in range(self.slots)]
        return np.zeros(len(high), dtype=np.float32), np.asarray(high, dtype=np.float32)
