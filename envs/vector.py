"""KVPrecisionVectorEnv: N KVPrecision episodes whose blocks run in ONE model forward.

``gym.make_vec("kvgym/KVPrecision-v0", num_envs=N, vectorization_mode="vector_entry_point", **env_kwargs)``
builds it (Gymnasium's CartPoleVectorEnv pattern: one registered id, a single and a vector class).

Why: a step's own work is small next to the model forward, and a forward of N blocks costs far
less than N forwards of one. Every row is a full :class:`~envs.kv_precision.KVPrecisionEnv` (the
rows share the model, the items and the reference passes) and runs exactly the single env's phases
(start an episode, commit the action, observe the block, compute the reward, score the endings
against the row's own cache, build the info); only the forwards are shared: the rows' blocks are
right-padded into one batch over a :class:`~quant.batched_cache.BatchedKVCache`, with each row's
positions and a mask so no row sees padding or another row. So each row's observation, reward and
info come from the same code as the single env's; the numbers differ only by float noise of the
batched matmuls (quantized settings amplify last-bit differences; see tests/envs/test_vector.py).

What the rows share beyond the forward is what would otherwise cost operators per row (on a GPU each is
a kernel launch, and those launches, not the device, bound the batched env: issue 14's op count): the
rows' kept floats live in one :class:`~quant.batched_cache.RowKVStore` (a step appends and reads every
row at once), the rows that commit the same setting in a step commit together (one quantization and one
write of every row's layers, ``MixedPrecisionKVCache.commit_rows``), and ``attn_var``'s head variance is
computed once per group of rows attended together (``features.head_variance``; all rows on a GPU, each row on
a CPU, :class:`envs.batched_forward.RowLayout`), each row's attention maps cut only when a feature reads them;
entropy and the target log-probs once per run of rows whose logits lie back to back (``features.LogitStats``).

``batch_scoring`` (default on): the rows whose episodes end in a step score their endings in the step's
block forward, beside the other rows' next blocks (each row's endings packed as the single env packs them,
:class:`envs.scoring.EndingsRow`; :mod:`envs.batched_forward` lays out both). With
``autoreset_mode="same_step"`` a row that ends starts its next episode in that forward, on the same row of the
store, so there the endings are scored first, in one forward of their own. On a GPU every forward is hundreds
of kernel launches, and scoring row by row took a fifth of a step of 64 rows (results/gpu_h200). On a CPU a
forward costs its FLOPs: the forward is padding-free (the rows' packed endings, 30-160 tokens on HellaSwag,
no longer pad every block row to their width), so there the endings' tokens share the weights' reads with the
blocks' (``experiments.bench_throughput --rows batched batched-scoring``: off, they score row by row).

With ``bit_budget``, :meth:`KVPrecisionVectorEnv.action_masks` stacks the rows' masks and each row's
commit phase enforces its budget as the single env does.

Autoreset is Gymnasium 1.x's NEXT_STEP mode by default: the step after a row terminates resets that
row (its action is ignored; reward 0, not terminated, the reset's observation and info).
``autoreset_mode="same_step"`` resets a row in the step it ends (its block 0 joins that step's
forward): the reset's observation and info, the ending's in ``infos["final_obs"]`` and
``infos["final_info"]`` (what SB3's VecEnv convention needs, see ``agents/sb3_vec.py``).

Reward terms that compare with a fixed setting's pass (``baseline_improvement``) get it from the
row's env, unbatched and computed once per prompt (shared by the rows, stored with the references):
the same numbers as the single env's, so a row running that fixed setting scores 0 up to the float
noise of the batched forward.

Not supported (a ValueError at construction): ``cache`` other than "mixed" (the batched forward
appends to our mixed-precision layers) and features that need ``saliency`` (an input-gradient
backward per row).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs.batched_forward import RowsOutput, RowTokens, forward_rows
from envs.features import BlockContext, LogitStats, head_variance
from envs.hellaswag import HellaSwagItem
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from envs.scoring import EndingsRow, batched_continuation_logprobs
from quant.batched_cache import RowKVStore
from quant.kv_cache import MixedPrecisionKVCache, bit_pair

__all__ = ["KVPrecisionVectorEnv"]


class KVPrecisionVectorEnv(gym.vector.VectorEnv):
    """N KVPrecision episodes stepped together, one batched forward per step (see module docstring)."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        config: EnvConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        lm=None,
        tokenizer=None,
        items: Sequence[HellaSwagItem] | None = None,
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        batch_scoring: bool = True,
        **overrides: Any,
    ):
        autoreset_mode = _autoreset_mode(autoreset_mode)
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or SAME_STEP, got {autoreset_mode}")
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if not isinstance(batch_scoring, (bool, np.bool_)):
            raise ValueError(f"batch_scoring must be True or False, got {batch_scoring!r}")
        first = KVPrecisionEnv(config, lm=lm, tokenizer=tokenizer, items=items, render_mode=render_mode, **overrides)
        if first.config.cache != "mixed":
            raise ValueError(
                f"the batched vector env runs our mixed-precision cache only, got cache={first.config.cache!r}; "
                'use gym.make_vec(..., vectorization_mode="sync") for the other backends'
            )
        if "saliency" in first.forward_needs:
            raise ValueError(
                "the batched vector env cannot compute saliency (an input-gradient backward per row); drop the "
                'saliency features or use gym.make_vec(..., vectorization_mode="sync")'
            )
        self.envs: list[KVPrecisionEnv] = [first] + [first.sibling() for _ in range(num_envs - 1)]
        self.batch_scoring = bool(batch_scoring)
        self.num_envs = num_envs
        self.config = first.config
        self.render_mode = None
        self.autoreset_mode = autoreset_mode
        self.metadata = {**self.metadata, "autoreset_mode": autoreset_mode}
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_names = first.observation_names
        self.timings: dict[str, float] = {}  # wall times of the last call (nondeterministic, so not in infos)
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._idle = np.zeros(num_envs, dtype=bool)
        self._queue: deque[int] | None = None  # rows still to start (reset's options["rows"] past num_envs)
        self._started = False
        #: every row's kept floats in one buffer, so a step reads and appends all rows at once
        self.store = RowKVStore(num_envs)
        features = first.feature_set.features + first.feature_set.token_features
        self._reads_head_variance = any(f.name == "attn_var" for f in features)  # computed once per step for all

    @property
    def model(self):
        return self.envs[0].model

    # --- gymnasium VectorEnv ------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Start an episode in every row. ``seed``: an int seeds row i with ``seed + i`` (Gymnasium's
        convention), or one seed per row. ``options={"rows": [r0, r1, ...]}`` gives row i HellaSwag row
        ``ri`` with its fixed shots, as the single env's ``options={"row": ri}``; rows past the first
        ``num_envs`` are a queue that autoresets take in order, and once it is empty a row that ends
        goes idle (see :attr:`idle`) until the next reset: a fixed list of episodes, each run once."""
        seeds = self._seeds(seed)
        options = dict(options or {})
        rows = options.pop("rows", None)
        if rows is not None and len(rows) < self.num_envs:
            raise ValueError(f"options['rows'] needs at least one HellaSwag row per env ({self.num_envs}), got {len(rows)}")
        if rows is not None and "row" in options:
            raise ValueError("pass options['rows'] (one per env) or options['row'], not both")
        if seeds is not None:
            self.action_space.seed(None if seeds[0] is None else seeds[0])
        starts = []
        for i, env in enumerate(self.envs):
            gym.Env.reset(env, seed=None if seeds is None else seeds[i])  # the row's np_random, as env.reset
            env._check_open()
            starts.append(self._start_row(i, options if rows is None else {**options, "row": rows[i]}))
        contexts = self._run_blocks([(i, 0) for i in range(self.num_envs)])[0]
        obs = np.stack([env._first_observation(ctx) for env, ctx in zip(self.envs, contexts, strict=True)])
        infos: dict[str, Any] = {}
        for i, info in enumerate(starts):
            infos = self._add_info(infos, info, i)
        self._autoreset[:] = False
        self._idle[:] = False
        self._queue = None if rows is None else deque(int(r) for r in rows[self.num_envs :])
        self._started = True
        return obs, infos

    def step(self, actions):
        if not self._started:
            raise RuntimeError("step() before reset()")
        actions = np.asarray(actions)
        if actions.shape[:1] != (self.num_envs,):
            raise ValueError(f"actions need a leading axis of num_envs={self.num_envs}, got shape {actions.shape}")
        t0 = time.perf_counter()
        n = self.num_envs
        obs = np.zeros((n, *self.single_observation_space.shape), dtype=np.float32)
        rewards = np.zeros(n, dtype=np.float64)
        terminations = np.zeros(n, dtype=bool)
        truncations = np.zeros(n, dtype=bool)
        infos: dict[str, Any] = {}
        commits: dict[int, Any] = {}
        ending: dict[int, Any] = {}  # rows whose episode ends in this step: their terminal commits
        starts: dict[int, dict[str, Any]] = {}
        to_run: list[tuple[int, int]] = []
        planned: dict[int, Any] = {}  # rows that commit a block in this step: their planned commits
        for i, env in enumerate(self.envs):
            if self._idle[i]:  # its action is ignored: nothing to run, reward 0, no info
                obs[i] = env._episode.last_obs
                continue
            if self._autoreset[i]:  # NEXT_STEP: this step resets the row; its action is ignored
                start = self._next_start(i)
                if start is None:
                    obs[i] = env._episode.last_obs
                    continue
                starts[i] = start
                to_run.append((i, 0))
                continue
            planned[i] = env._plan_commit(actions[i])
        self._commit_blocks(planned)
        for i, commit in planned.items():
            env = self.envs[i]
            commit = env._committed(commit)
            if not commit.terminal:
                commits[i] = commit
                to_run.append((i, env._episode.block_index))
            else:
                ending[i] = commit
        # with batch_scoring (NEXT_STEP), the rows that end score their endings in the block forward below;
        # else they are scored first, and a SAME_STEP row's next episode joins the block forward
        in_forward = self._scores_in_block_forward(list(ending))
        if ending and not in_forward:
            t_score = time.perf_counter()
            scores = self._score_endings(list(ending))
            score_seconds = (time.perf_counter() - t_score) / len(ending)  # each row's share
            infos = self._end_episodes(ending, scores, score_seconds, obs, rewards, terminations, truncations,
                                       infos, starts, to_run)
        to_run.sort()  # rows in order in the batch, restarted ones among them
        scoring = sorted(ending) if in_forward else []
        found, scores, seconds = self._run_blocks(to_run, scoring)
        contexts = dict(zip((i for i, _ in to_run), found, strict=True))
        if in_forward:
            infos = self._end_episodes(ending, scores, seconds, obs, rewards, terminations, truncations, infos,
                                       starts, to_run)
        for i, env in enumerate(self.envs):
            if i in starts:
                obs[i] = env._first_observation(contexts[i])
                infos = self._add_info(infos, starts[i], i)
            elif i in commits:
                obs[i], rewards[i], terminations[i], truncations[i], info = env._finish_step(
                    commits[i], contexts[i], None, 0.0
                )
                infos = self._add_info(infos, info, i)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._autoreset = terminations | truncations
        self.timings = {"step_ms": 1000 * (time.perf_counter() - t0)}
        return obs, rewards, terminations, truncations, infos

    def _commit_blocks(self, planned: dict[int, Any]) -> None:
        """Commit each row's pending block as planned: the rows that chose the same plain setting together
        (``MixedPrecisionKVCache.commit_rows``: one quantization for all of them), the others one by one."""
        together: dict[tuple[int, int], list[MixedPrecisionKVCache]] = {}
        for i, commit in planned.items():
            env = self.envs[i]
            setting = env.stacked_setting(commit)
            if setting is None:
                env._commit_block(commit)
            else:
                together.setdefault(bit_pair(setting), []).append(env._episode.cache)
        for setting, caches in together.items():
            MixedPrecisionKVCache.commit_rows(caches, setting)

    def action_masks(self) -> np.ndarray:
        """``[num_envs, n_actions]`` bool: row i is ``envs[i].action_masks()`` (sb3-contrib's layout). Each
        row's ``step`` enforces its own budget through the single env's commit phase, so an infeasible
        action is replaced there exactly as in the single env. A row whose next step resets it (NEXT_STEP)
        or that sits idle ignores its action, and its mask is all True."""
        return np.stack([env.action_masks() for env in self.envs])

    @property
    def idle(self) -> np.ndarray:
        """Rows that ended with reset's queue of rows empty: they sit out every step until the next reset."""
        return self._idle.copy()

    def _next_start(self, i: int) -> dict[str, Any] | None:
        """Start row i's next episode (the queue's next row, else drawn); None when it goes idle instead."""
        if self._queue is None:
            return self._start_row(i, {})
        if not self._queue:
            self._idle[i] = True
            return None
        return self._start_row(i, {"row": self._queue.popleft()})

    def _start_row(self, i: int, options: Mapping[str, Any]) -> dict[str, Any]:
        """Row i's next episode (the single env's start), its cache keeping its floats in row i of the store."""
        info = self.envs[i]._start_episode(options)
        self.store.attach(i, self.envs[i]._episode.cache)
        return info

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.envs:
            env.close()

    # --- internals ----------------------------------------------------------------------------
    def _end_episodes(
        self, ending: dict[int, Any], scores: dict[int, np.ndarray], seconds: float, obs: np.ndarray,
        rewards: np.ndarray, terminations: np.ndarray, truncations: np.ndarray, infos: dict[str, Any],
        starts: dict[int, dict[str, Any]], to_run: list[tuple[int, int]],
    ) -> dict[str, Any]:
        """The terminal step of every row in ``ending`` (the single env's, its endings' ``scores`` given); with
        SAME_STEP a row that has a next item starts it now (added to ``starts`` and ``to_run``). The infos."""
        for i, commit in ending.items():
            env = self.envs[i]
            obs[i], rewards[i], terminations[i], truncations[i], info = env._finish_step(
                commit, None, scores[i], seconds
            )
            start = self._next_start(i) if self.autoreset_mode == AutoresetMode.SAME_STEP else None
            if start is not None:  # SAME_STEP: restart now, in this step's forward
                infos = self._add_info(infos, {"final_obs": obs[i].copy(), "final_info": info}, i)
                starts[i] = start
                to_run.append((i, 0))
            else:
                infos = self._add_info(infos, info, i)
        return infos

    def _scores_in_block_forward(self, rows: list[int]) -> bool:
        """Whether the endings of ``rows`` (their episodes end in this step) are scored in the step's block
        forward: with ``batch_scoring`` and NEXT_STEP autoreset (a SAME_STEP row's next episode takes its row
        of the store in that forward, so its endings are scored first), where the model allows packing."""
        return (bool(rows) and self.batch_scoring and self.autoreset_mode == AutoresetMode.NEXT_STEP
                and self.envs[rows[0]]._pack_endings)

    def _score_endings(self, rows: list[int]) -> dict[int, np.ndarray]:
        """The endings of every row whose episode ends in this step, before the block forward: with
        ``batch_scoring``, all in ONE forward, each against its row's own cache
        (:func:`envs.scoring.batched_continuation_logprobs`), every cache branched so it is left as it was, as
        the single env's scoring leaves it; else (or for one row, or a model whose attention a packed row
        cannot mask) row by row, the single env's path."""
        if not self.batch_scoring or len(rows) <= 1 or not self.envs[rows[0]]._pack_endings:
            return {i: self.envs[i]._score_current() for i in rows}
        episodes = [self.envs[i]._episode for i in rows]
        with contextlib.ExitStack() as stack:
            for ep in episodes:
                stack.enter_context(ep.cache.branch(1))
            scores = batched_continuation_logprobs(
                self.model, [ep.cache for ep in episodes], [ep.prompt_ids for ep in episodes],
                [ep.endings for ep in episodes], [ep.last_logits for ep in episodes], self.store, rows,
            )
        for ep in episodes:
            ep.done = True
        return {i: np.asarray(row, dtype=np.float64) for i, row in zip(rows, scores, strict=True)}

    def _seeds(self, seed) -> list[int | None] | None:
        if seed is None:
            return None
        if isinstance(seed, (int, np.integer)):
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"need one seed per env ({self.num_envs}), got {len(seeds)}")
        return seeds

    def _run_blocks(
        self, blocks: list[tuple[int, int]], scoring: list[int] = ()
    ) -> tuple[list[BlockContext], dict[int, np.ndarray], float]:
        """Run block ``index`` of row ``i`` for every ``(i, index)`` and score the endings of every row in
        ``scoring`` (its episode ends in this step), all in ONE forward (:func:`envs.batched_forward.forward_rows`):
        ``(the blocks' contexts in order, each scoring row's ending scores, each row's share of the forward's
        seconds)``.

        Each block row's new keys/values go to its own cache (pending, as the single env leaves them); its
        logits and attention maps are cut back to its own tokens and keys. A scoring row's endings are packed
        into its row as the single env packs them (:class:`envs.scoring.EndingsRow`), its cache branched so it
        is left as it was.
        """
        rows = sorted(list(blocks) + [(i, None) for i in scoring])
        if not rows:
            return [], {}, 0.0
        model, device = self.model, self.model.device
        ending = {i: EndingsRow.of(self.envs[i]._episode.last_logits, self.envs[i]._episode.endings, device)
                  for i in scoring}
        tokens = [RowTokens(self.envs[i]._block_tokens(index)) if index is not None else ending[i].tokens
                  for i, index in rows]
        attentions = "attentions" in self.envs[0].forward_needs and bool(blocks)
        logits, seconds = None, 0.0  # none: only scoring rows, every ending one token long (nothing to run)
        if any(t.ids for t in tokens):
            t0 = time.perf_counter()
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                for i in scoring:
                    stack.enter_context(self.envs[i]._episode.cache.branch(1))
                out = forward_rows(model, [self.envs[i]._episode.cache for i, _ in rows], tokens, self.store,
                                   [i for i, _ in rows], output_attentions=attentions)
            seconds = (time.perf_counter() - t0) / len(rows)  # each row's share of the forward
            logits = out.logits
        variances: dict[int, torch.Tensor] = {}  # group -> its rows' head variance, once per group
        stats = self._logit_stats(out, rows) if blocks else {}
        contexts, scores = [], {}
        for r, (i, index) in enumerate(rows):
            if index is None:
                scores[i] = np.asarray(ending[i].scores(None if logits is None else logits[r]), dtype=np.float64)
                self.envs[i]._episode.done = True
                continue
            n = len(tokens[r].ids)
            maps = out.row_maps(r) if attentions else None
            values = None
            if attentions and self._reads_head_variance:
                group, k = out.group_of(r)
                if group not in variances:
                    variances[group] = head_variance(out.group_maps(group))
                values = {"head_variance": variances[group][k, :n]}
            contexts.append(self.envs[i]._block_context(index, logits[r], maps, None, seconds, values, stats[r]))
        return contexts, scores, seconds

    def _logit_stats(self, out: RowsOutput, rows: list[tuple[int, int | None]]) -> dict[int, tuple[LogitStats, int]]:
        """Per block row r of the forward: the :class:`~envs.features.LogitStats` of its run of rows whose logits
        lie back to back (:meth:`RowsOutput.runs`), and its offset in them. Entropy and the target log-probs
        then cost one pass per run, not per row (on a GPU, a run's ops instead of every row's)."""
        targets = {r: self.envs[i]._block_targets(index) for r, (i, index) in enumerate(rows) if index is not None}
        shared = {}
        for run, logits in out.runs(sorted(targets)):
            run_stats = LogitStats(logits, torch.tensor([t for r in run for t in targets[r]], device=logits.device))
            offset = 0
            for r in run:
                shared[r], offset = (run_stats, offset), offset + len(targets[r])
        return shared


def _autoreset_mode(value: AutoresetMode | str) -> AutoresetMode:
    """An ``AutoresetMode`` from itself, its value ("SameStep") or its name in any case ("same_step")."""
    if isinstance(value, AutoresetMode):
        return value
    key = str(value).replace("_", "").lower()
    for mode in AutoresetMode:
        if key in (mode.value.lower(), mode.name.replace("_", "").lower()):
            return mode
    raise ValueError(f"unknown autoreset_mode {value!r}; choose from {[m.value for m in AutoresetMode]}")
