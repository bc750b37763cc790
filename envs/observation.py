"""Turn one block that has just run through the model into the policy's observation.

The env (one block per step) and controller-driven generation (one block per ``interval`` decoded
tokens) observe blocks the same way, so a policy trained in the env reads the same numbers while
generating: both go through :class:`BlockObserver`, which owns the episode's running token
frequency, block count and token position, reads the episode state off the cache and summarises the block with the
:class:`~envs.features.FeatureSet`.
"""

from __future__ import annotations

import numpy as np
import torch

from envs.features import (
    BlockContext,
    EpisodeState,
    FeatureSet,
    LogitStats,
    RunningFrequency,
    TokenVocabulary,
)

__all__ = ["BlockObserver"]


class BlockObserver:
    """Observations of the consecutive blocks of one episode (or one generation)."""

    def __init__(self, feature_set: FeatureSet, n_blocks: int, vocab: TokenVocabulary | None = None):
        if "vocab" in feature_set.needs and vocab is None:
            raise ValueError("the features need the tokenizer's vocabulary: pass vocab=TokenVocabulary.from_tokenizer(...)")
        self.feature_set = feature_set
        self.n_blocks = n_blocks
        self.vocab = vocab
        self.frequency = RunningFrequency()
        self.seen: set[int] = set()  # token ids of the blocks observed so far (``novelty``)
        self.block_index = 0  # index of the next block to observe
        self.position = 0  # sequence position of the next block's first token

    def context(
        self,
        token_ids: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        cache,
        *,
        attentions: tuple[torch.Tensor, ...] | None = None,
        saliency: torch.Tensor | None = None,
        forward_seconds: float = 0.0,
        batch_values: dict[str, torch.Tensor] | None = None,
        logit_stats: tuple[LogitStats, int] | None = None,
    ) -> BlockContext:
        """The :class:`BlockContext` of the next block; ``cache`` holds it pending (see ``BlockContext``)."""
        index, start = self.block_index, self.position
        self.block_index += 1
        self.position += len(token_ids)
        state = EpisodeState.from_cache(cache, index, max(self.n_blocks, index + 1), start)
        return BlockContext(
            token_ids=token_ids,
            logits=logits,
            targets=targets,
            state=state,
            frequency=self.frequency,
            seen=self.seen,
            vocab=self.vocab,
            attentions=attentions,
            saliency=saliency,
            cache=cache,
            forward_seconds=forward_seconds,
            batch_values=dict(batch_values or {}),
            logit_stats=logit_stats,
        )

    def observe(self, ctx: BlockContext) -> np.ndarray:
        """The observation vector (float32, in ``feature_set.observation_names`` order)."""
        return np.asarray(self.feature_set.observe(ctx), dtype=np.float32)
