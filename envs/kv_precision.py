"""KVPrecision-v0: choose the KV-cache bit-width of every block of a task's prompt (k-shot HellaSwag by default).

One episode is one item of the env's task (``envs.tasks``: ``task: hellaswag``, the default, or
``passkey``, ...) with ``shots`` solved examples before it where the task has shots. The prompt is cut into
blocks of ``interval`` tokens; ``reset`` runs block 0 and returns its features; each ``step``
commits the pending block to the cache at the setting ``bits[action]`` (the policy decides how
precisely the tokens it has just *seen* are remembered; a setting is a width or a (key_bits,
value_bits) pair, see ``envs.settings``; with ``layer_groups > 1`` the action picks one setting per
group of consecutive layers), runs the next block against the now partly quantized
cache and returns that block's features. After the last block is committed, the four endings are
scored against the cache (in one batched forward where the cache can branch along the batch) and the
episode terminates. The cache is ours by default; ``cache="quanto"`` runs the same episodes on
transformers' quanto ``QuantizedCache`` (the library baseline), ``cache="dynamic"`` on a plain one.

With ``bit_budget`` the episode's average bits can never exceed the budget (``envs.budget``):
``action_masks()`` marks the settings that keep it reachable, and a masked action is replaced by the
most precise feasible setting below it, with ``info["budget_enforced"]`` and
``info["requested_setting"]`` saying so (HAQ's enforcement: random actions and the env checkers work).

With ``protect_bits`` the action also marks tokens of the block (``MultiDiscrete([len(bits)] + [2] *
interval)``): the marked ones are stored at ``protect_bits``, each run on its own, the rest at the setting, so
a policy can keep the few tokens that carry an answer precise without paying for their whole block; a budget
keeps the earliest marks that fit. ``token_features`` shows per-token features token by token, what such a
policy reads (``agents.token_select``).

Rewards compare with a full-precision reference pass of the same prompt (computed once per prompt,
kept in memory and stored on disk by ``envs.reference_store``), so the signal is the damage
quantization did rather than how hard the item is; ``baseline_scores(setting)`` is the same for a
fixed setting's pass (the ``baseline_improvement`` reward's baseline). ``device``/``dtype`` ``"auto"`` put the model and
every tensor the env creates on CUDA in bf16 when a GPU is visible, else on the CPU in float32.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml

from envs import ENV_ID  # noqa: F401  (re-exported)
from envs.budget import (
    block_bit_sum,
    check_budget,
    check_reachable,
    fallback_action,
    feasible_mask,
    protect_allowance,
)
from envs.cache_kwarg import with_cache
from envs.episodes import EpisodeSet, episode_set, parse_episode_set
from envs.evidence import evidence_char_spans, overlapping_tokens, token_char_spans
from envs.features import DEFAULT_FEATURES, FULL_BITS, BlockContext, FeatureSet, LogitStats, TokenVocabulary
from envs.fingerprint import process_fingerprint_id
from envs.hellaswag import HellaSwagItem, item_rng, load_hellaswag
from envs.model import load_model, resolve_device, resolve_dtype
from envs.observation import BlockObserver
from envs.quantities import FORWARD_OUTPUTS, StepRecord, StepState, StepView
from envs.reference_store import ReferenceKey, ReferenceStore, model_digest, tokens_digest
from envs.rewards import DEFAULT_REWARDS, RewardFunction
from envs.scoring import CACHED_SCORING, can_pack, continuation_logprobs, encode_pair
from envs.settings import Setting, normalize_menu, normalize_setting, parse_setting, setting_name
from envs.tasks import Task, TaskItem, make_task
from quant.baselines import CACHE_KINDS, EpisodeCache, check_cache_bits, episode_cache
from quant.kv_cache import BlockBits, MixedPrecisionKVCache, layer_groups
from quant.weights import quantize_model_weights


@dataclass
class EnvConfig:
    """Everything that defines the task. Python: ``EnvConfig(shots=3)``; YAML: the same keys."""

    model: str = "embedded"  # see envs.model.load_model: "embedded", hub id, local dir, .gguf, "tiny-random-llama"
    # what an episode asks (envs.tasks): "hellaswag" (k-shot HellaSwag) or "passkey" (key retrieval), or
    # any registered task; task_options are its own settings, e.g. {length: 1024, depth: [0, 1], keys: 1}
    task: str = "hellaswag"
    task_options: dict[str, Any] = field(default_factory=dict)
    # HellaSwag JSONL or "Rowan/hellaswag"; None = the shared file (passkey builds its haystack from it)
    data_path: str | None = None
    split: str = "train"  # "train": items from the pool; "eval": the held-out items
    eval_size: int = 1000  # held-out items (the rest is the pool for shots and training)
    split_seed: int = 0
    shots: int = 5  # 5 shots give ~520-token prompts: several blocks
    interval: int = 64  # tokens per block (one decision per block)
    # the menu: one action per setting, an int (keys and values at that width) or a [key_bits,
    # value_bits] pair, each of 2/3/4/8/16 (envs.settings), e.g. [2, [4, 2], 4, [8, 4], 16]
    bits: tuple[Setting | str, ...] = (2, 4, 8, 16)  # a name ("k4v2") is read as envs.settings spells it
    # the first N tokens of the sequence stay fp16 whatever their block's setting (attention sinks;
    # IntactKV, KVQuant); they count 16 bits in avg_bits and their fp16 bytes in kv_bytes
    sink_tokens: int = 0
    # one setting per group of consecutive layers (must divide the layer count): the action becomes
    # MultiDiscrete([len(bits)] * layer_groups); 1 keeps Discrete(len(bits))
    layer_groups: int = 1
    # the episode's average bits (token-weighted (key_bits + value_bits) / 2, sink tokens at 16) can never
    # exceed this (envs.budget): action_masks() marks the settings that keep it reachable and a masked
    # action is replaced by the most precise feasible setting below it (info["budget_enforced"]).
    # None: no budget. Needs layer_groups: 1 (per-group masks cannot express a budget on their sum).
    bit_budget: float | None = None
    # per-token precision (issue 15): the tokens of a block that the action marks are stored at this setting
    # (an int or a [key_bits, value_bits] pair) instead of the block's, each run of them quantized on its own;
    # the action becomes MultiDiscrete([len(bits)] + [2] * interval): the block's setting, then one 0/1 per
    # token of the block (entries past a short block's end are ignored). A budget trims the marks that do not
    # fit (info["protected_tokens"]). None: one setting per block. Needs layer_groups: 1 and cache: mixed.
    protect_bits: Setting | str | None = None
    # store the keys (values) of every quantized run in a Hadamard-rotated basis (QuaRot; quant.rotation),
    # rotated back when read: the same bits and bytes. Needs cache: mixed.
    rotate_keys: bool = False
    rotate_values: bool = False
    features: tuple[str, ...] = DEFAULT_FEATURES
    # per-token features also observed token by token after the block summaries (``digits@0 .. digits@63``,
    # interval entries each, 0 past the block's end): what a policy marking tokens reads (envs.features)
    token_features: tuple[str, ...] = ()
    rewards: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_REWARDS))
    weight_quant: str = "none"  # "none", "int8-pertensor", "int8", "int4" (see quant.weights)
    group_size: int = 64  # quantization group of the KV cache
    max_prompt_tokens: int = 1536  # longer prompts drop their earliest shots (documented truncation)
    # "auto": CUDA when visible, else the CPU; or any torch device string ("cpu", "cuda", "cuda:1")
    device: str = "auto"
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on the CPU; or "float32", "bfloat16", "float16"
    reference_cache_size: int = 4096  # prompts whose reference (and rows whose token ids) are kept in memory
    # full-precision references on disk (envs.reference_store), reused across processes and runs:
    # True = $KVGYM_CACHE/references (default ~/.cache/kvgym/references), a path = there, False = off
    reference_store: bool | str = True
    # a named episode set (envs.episodes: "train-<seed>-<n>", "eval-<n>") that reset() without a row
    # draws from, so every episode's reference is computed once; None = any item with fresh shots
    episodes: str | None = None
    # KV cache backend (quant.baselines): "mixed" = our MixedPrecisionKVCache, one width per block from
    # ``bits``; "quanto" = transformers' QuantizedCache (quanto backend) at the one width ``bits`` lists
    # ([2] or [4]: its bits are fixed, so a menu is an error); "dynamic" = a plain DynamicCache, bits [16].
    cache: str = "mixed"

    def __post_init__(self) -> None:
        """Settings written by name (``"k4v2"``, as configs and ``--set`` may spell them) become the canonical
        ints and pairs every reader of the config expects; a name that does not parse is left for :meth:`validate`."""
        self.bits = tuple(_named_setting(b) for b in self.bits)
        self.protect_bits = _named_setting(self.protect_bits)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EnvConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown env config key(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        for key in ("features", "token_features"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get("protect_bits"), list):
            values["protect_bits"] = tuple(values["protect_bits"])
        if values.get("bits") is not None:  # YAML's [4, 2] -> (4, 2); "k4v2" and [4, 4] -> their canonical form
            values["bits"] = tuple(tuple(b) if isinstance(b, list) else b for b in values["bits"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> EnvConfig:
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})

    def validate(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {self.split!r}")
        menu = normalize_menu(self.bits)
        for key in ("sink_tokens", "layer_groups"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0 (0: no fp16 sink tokens), got {self.sink_tokens}")
        if self.layer_groups < 1:
            raise ValueError(f"layer_groups must be >= 1 (1: one setting for all layers), got {self.layer_groups}")
        check_cache_bits(self.cache, menu, self.sink_tokens, self.layer_groups)
        if self.protect_bits is not None:
            normalize_setting(self.protect_bits)  # ValueError on an unsupported width
            if self.layer_groups != 1 or self.cache != "mixed":
                raise ValueError(
                    f"protect_bits needs layer_groups: 1 and cache: mixed (got layer_groups={self.layer_groups}, "
                    f"cache={self.cache!r}): per-token precision is a feature of our mixed-precision cache's "
                    "one-setting commit"
                )
        for key in ("rotate_keys", "rotate_values"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            if value and self.cache != "mixed":
                raise ValueError(
                    f"{key} needs cache: mixed (got {self.cache!r}): rotation is a feature of our mixed-precision cache"
                )
        check_budget(self.bit_budget, menu, self.layer_groups)
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        make_task(self.task, self.task_options)  # ValueError on an unknown task (listing the known) or bad options
        resolve_dtype(self.dtype, resolve_device(self.device))  # ValueError on an unknown or unusable one
        if not isinstance(self.reference_store, (bool, str)) or self.reference_store == "":
            raise ValueError(f"reference_store must be true, false or a folder, got {self.reference_store!r}")
        if self.episodes is not None and parse_episode_set(self.episodes).split != self.split:
            raise ValueError(f"episode set {self.episodes!r} is not from the env's split {self.split!r}")


def _named_setting(value: Any) -> Any:
    """``parse_setting(value)`` for a string that spells a setting; anything else unchanged."""
    if isinstance(value, str):
        try:
            return parse_setting(value)
        except ValueError:
            return value
    return value


class _Loaded:
    """A model + tokenizer shared by every env of a process with the same settings (weak refs)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer


_MODELS: weakref.WeakValueDictionary[tuple, _Loaded] = weakref.WeakValueDictionary()
_DATA: dict[str, list[HellaSwagItem]] = {}


def _shared_model(cfg: EnvConfig) -> _Loaded:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    key = (cfg.model, dtype, device, cfg.weight_quant)
    loaded = _MODELS.get(key)
    if loaded is None:
        model, tokenizer = load_model(cfg.model, dtype=dtype, device=device, attn_implementation="eager")
        quantize_model_weights(model, cfg.weight_quant)
        loaded = _Loaded(model, tokenizer)
        _MODELS[key] = loaded
    return loaded


def _shared_items(path: str | None) -> list[HellaSwagItem]:
    key = str(path)
    if key not in _DATA:
        _DATA[key] = load_hellaswag(path) if path is not None else load_hellaswag()
    return _DATA[key]


@dataclass
class _Episode:
    """Per-episode state; replaced wholesale on reset so nothing leaks between episodes."""

    item: TaskItem
    prompt_ids: list[int]
    endings: list[list[int]]
    blocks: list[tuple[int, int]]  # [start, end) token positions
    reference: _Reference
    cache: EpisodeCache
    observer: BlockObserver
    block_index: int = 0
    last_logits: torch.Tensor | None = None
    last_obs: np.ndarray | None = None
    done: bool = False
    #: nominal bits of the committed tokens (envs.budget.block_bit_sum summed): the budget's ledger
    committed_bit_sum: float = 0.0
    #: the prompt text the ids encode (Task.context with the shots kept): where evidence is looked up
    context: str = ""


@dataclass(frozen=True)
class EnvSnapshot:
    """What :meth:`KVPrecisionEnv.snapshot` returns: a private copy of one episode's state (opaque)."""

    env_id: int  # id() of the env that took it
    episode: _Episode
    reward_terms: dict[str, Any]


@dataclass
class _Commit:
    """A step's action, committed: what ``_finish_step`` needs to report it."""

    settings: list[Setting]
    t0: float  # when the step started (perf_counter)
    before: int  # committed bytes before the commit
    before_fp16: int
    block_tokens: int  # tokens of the block committed
    requested: list[Setting] = field(default_factory=list)  # what the action asked for (before the budget)
    budget_enforced: bool = False  # the budget replaced the requested setting(s) or dropped marked tokens
    protect: list[bool] | None = None  # per token of the block: kept at protect_bits (after the budget)
    protected: int = 0  # tokens of the block kept at protect_bits (sinks aside), after the budget
    requested_protected: int = 0  # tokens the action marked (sinks aside)
    # filled in once the cache has committed the block (KVPrecisionEnv._committed)
    after: int = 0  # committed bytes right after the commit
    after_fp16: int = 0
    terminal: bool = False


@dataclass
class _Reference:
    """Full-precision pass of one prompt: per-position target log-probs and the ending scores."""

    target_logprobs: torch.Tensor  # [P-1]: log p(prompt[i+1] | prompt[:i+1])
    ending_scores: np.ndarray  # [n_endings] summed log-probs
    pred: int
    pred_norm: int


def cut_blocks(length: int, interval: int) -> list[tuple[int, int]]:
    """``[start, end)`` token blocks of a prompt of ``length`` tokens: ``interval`` each, the last shorter."""
    return [(s, min(s + interval, length)) for s in range(0, length, interval)]


class KVPrecisionEnv(gym.Env):
    """Gymnasium env over real quantized decoding of a task's prompts (see module docstring)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: EnvConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        lm=None,
        tokenizer=None,
        items: Sequence[HellaSwagItem] | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ):
        if render_mode is not None:
            # TypeError, like any unsupported keyword: SB3's make_vec_env first tries
            # render_mode="rgb_array" and falls back to no render_mode on exactly this error.
            raise TypeError(f"KVPrecisionEnv cannot render (render_mode={render_mode!r}); leave render_mode unset")
        self.render_mode = None
        if config is None:
            cfg = EnvConfig()
        elif isinstance(config, EnvConfig):
            cfg = config
        elif isinstance(config, (str, Path)):
            cfg = EnvConfig.from_yaml(config)
        else:
            cfg = EnvConfig.from_dict(config)
        if overrides:
            cfg = EnvConfig.from_dict({**dataclasses.asdict(cfg), **overrides})
        cfg.validate()
        self.config = cfg
        #: the normalized menu (envs.settings): ints, and (key_bits, value_bits) tuples for unequal halves
        self.bits: tuple[Setting, ...] = normalize_menu(cfg.bits)
        self.layer_groups: int = cfg.layer_groups
        self.feature_set = FeatureSet(cfg.features, cfg.token_features, cfg.interval)
        #: the setting of the tokens an action marks (EnvConfig.protect_bits), None: no per-token choice
        self.protect_bits: Setting | None = None if cfg.protect_bits is None else normalize_setting(cfg.protect_bits)
        if cfg.cache != "mixed" and self.feature_set.needs & {"cache", "saliency"}:
            raise ValueError(
                f"features needing {sorted(self.feature_set.needs & {'cache', 'saliency'})} read our mixed-precision "
                f"cache; they cannot run with cache={cfg.cache!r} (choose from {CACHE_KINDS} or drop them)"
            )
        self.reward_fn = RewardFunction(cfg.rewards)
        self.observation_names: tuple[str, ...] = self.feature_set.observation_names
        self.deterministic = self.feature_set.deterministic and self.reward_fn.deterministic
        #: what the model's forward must produce beyond logits, for the features and the reward terms
        self.forward_needs = self.feature_set.needs | (self.reward_fn.quantities & FORWARD_OUTPUTS)
        low, high = self.feature_set.bounds()
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.timings: dict[str, float] = {}  # wall times of the last step (nondeterministic, so not in info)
        if self.protect_bits is not None:  # the block's setting, then one 0/1 mark per token of the block
            self.action_space = gym.spaces.MultiDiscrete([len(self.bits)] + [2] * cfg.interval)
        elif cfg.layer_groups == 1:
            self.action_space = gym.spaces.Discrete(len(self.bits))
        else:
            self.action_space = gym.spaces.MultiDiscrete([len(self.bits)] * cfg.layer_groups)

        if (lm is None) != (tokenizer is None):
            raise ValueError("pass both lm (a loaded model) and tokenizer, or neither")
        self._loaded = _shared_model(cfg) if lm is None else _Loaded(lm, tokenizer)
        #: whether the endings are scored in one packed row (envs.scoring.can_pack: no sliding windows)
        self._pack_endings: bool = can_pack(self.model)
        #: the layers of each layer group (ValueError here if layer_groups does not divide the layers)
        self.layer_group_layers: list[range] = layer_groups(_num_layers(self.model), cfg.layer_groups)
        #: the task (envs.tasks) its items, prompts and candidates come from
        self.task: Task = make_task(cfg.task, cfg.task_options)
        #: the HellaSwag records loaded (the hellaswag task's items; the text a generated task draws from)
        self._source_items: list[HellaSwagItem] = list(items) if items is not None else _shared_items(cfg.data_path)
        all_items = self.task.load(self._source_items, self.tokenizer, _max_positions(self.model))
        splits = self.task.split(all_items, cfg.eval_size, cfg.split_seed)
        self.pool: list[TaskItem] = list(splits.pool)
        self.items: list[TaskItem] = list(splits.eval if cfg.split == "eval" else splits.pool)
        if not self.items:
            raise ValueError(f"the {cfg.split!r} split is empty (eval_size={cfg.eval_size}, items={len(all_items)})")
        self._rows = {item.row: item for item in all_items}
        self._pool_rows = frozenset(item.row for item in self.pool)
        self._references: OrderedDict[tuple[int, ...], _Reference] = OrderedDict()
        #: baseline passes (baseline_scores) by (variant, prompt and ending tokens); siblings share it
        self._baselines: OrderedDict[tuple, np.ndarray] = OrderedDict()
        #: a row's tokenized inputs with its fixed shots (``_row_inputs``), kept like the references: an
        #: evaluation or an episode set resets the same rows again and again, and on a GPU tokenizing the
        #: prompt and its endings was 8% of the batched env's time (issue 14's profile)
        self._inputs: OrderedDict[int, tuple[TaskItem, list[int], list[list[int]], int, str]] = OrderedDict()
        #: the named episode set reset() draws from (None: any item of the split, fresh shots)
        self.episodes: EpisodeSet | None = episode_set(cfg.episodes, self.items) if cfg.episodes else None
        store = cfg.reference_store
        self.reference_store: ReferenceStore | None = (
            None if store is False else ReferenceStore(None if store is True else store)
        )
        self._new_cache()  # fail here, not in reset, on a cache the model cannot hold (e.g. quanto's group size)
        self._episode: _Episode | None = None
        self._closed = False

    # --- gymnasium spec: measured terms/features make the env nondeterministic ----------------
    @property
    def spec(self):
        return self._spec if hasattr(self, "_spec") else None

    @spec.setter
    def spec(self, value) -> None:
        if value is not None and not getattr(self, "deterministic", True):
            value = dataclasses.replace(value, nondeterministic=True)
        self._spec = value

    @property
    def model(self):
        return self._loaded.model

    @property
    def tokenizer(self):
        return self._loaded.tokenizer

    # --- episode ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode. ``options={"row": r}`` picks the task's row ``r`` with its fixed shots
        (the same for every policy: evaluation uses this); otherwise an episode of the env's
        episode set (``episodes``) is drawn with ``self.np_random``, or, without a set, an item of the
        env's split with fresh shots."""
        super().reset(seed=seed)
        self._check_open()
        info = self._start_episode(options or {})
        return self._first_observation(self._run_block(0)), info

    # reset and step in phases: the batched vector env (envs.vector) runs the same phases per row,
    # with the model forward of every row's block done in one batch between them
    def _start_episode(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Pick the item (``options["row"]`` or drawn), fetch its reference, set up a new episode; its info."""
        t0 = time.perf_counter()
        if "row" in options:
            item, prompt_ids, endings, n_shots, context = self._row_inputs(int(options["row"]))
        elif self.episodes is not None:
            row = self.episodes.rows[int(self.np_random.integers(len(self.episodes.rows)))]
            item, prompt_ids, endings, n_shots, context = self._row_inputs(row)
        else:
            item = self.items[int(self.np_random.integers(len(self.items)))]
            shots = self.task.shots(item, self.pool, self.config.shots, self.np_random)
            prompt_ids, endings, n_shots, context = self._tokenize(item, shots)
        reference = self._reference(prompt_ids, endings, item)
        self.timings = {"reference_ms": 1000 * (time.perf_counter() - t0)}
        blocks = cut_blocks(len(prompt_ids), self.config.interval)
        if self.config.bit_budget is not None:
            check_reachable(
                self.config.bit_budget, self.bits, len(prompt_ids), self.config.sink_tokens, f"row {item.row}"
            )
        vocab = TokenVocabulary.from_tokenizer(self.tokenizer) if "vocab" in self.feature_set.needs else None
        observer = BlockObserver(self.feature_set, len(blocks), vocab)
        self._episode = _Episode(
            item, prompt_ids, endings, blocks, reference,
            self._new_cache(tokens=len(prompt_ids) + sum(map(len, endings))), observer, context=context
        )
        return {"row": item.row, "blocks": len(blocks), "prompt_tokens": len(prompt_ids), "shots": n_shots}

    def _first_observation(self, ctx: BlockContext) -> np.ndarray:
        """The observation of block 0 (just run); starts the reward's episode."""
        obs = self._observe(ctx)
        self.reward_fn.reset(self._step_view(None, ctx))
        self.timings["forward_ms"] = 1000 * ctx.forward_seconds
        return obs

    def episode_inputs(self, row: int) -> tuple[TaskItem, list[int], list[list[int]]]:
        """Item, prompt ids and ending ids of the task's row ``row`` with its fixed shots, exactly as
        ``reset(options={"row": row})`` builds them (baselines outside the env score the same tokens)."""
        return self._row_inputs(row)[:3]

    def _row_inputs(self, row: int) -> tuple[TaskItem, list[int], list[list[int]], int, str]:
        if row not in self._rows:
            raise ValueError(f"row {row} is not among the {self.config.task!r} task's items")
        if self.config.split == "eval" and row in self._pool_rows:
            raise ValueError(f"row {row} is in the shot pool, not the held-out split")
        found = self._inputs.get(row)
        if found is None:
            item = self._rows[row]
            shots = self.task.shots(item, self.pool, self.config.shots, item_rng(self.config.split_seed, row))
            found = self._inputs[row] = (item, *self._tokenize(item, shots))
            if len(self._inputs) > self.config.reference_cache_size:
                self._inputs.popitem(last=False)
        else:
            self._inputs.move_to_end(row)
        item, prompt_ids, endings, n_shots, context = found
        return item, list(prompt_ids), [list(e) for e in endings], n_shots, context

    def sibling(self, **overrides: Any) -> KVPrecisionEnv:
        """A new env on the same model, items and reference passes with some config keys changed
        (``env.sibling(cache="quanto", bits=(4,))``: the quanto baseline on exactly this env's episodes)."""
        cfg = EnvConfig.from_dict({**dataclasses.asdict(self.config), **overrides})
        env = KVPrecisionEnv(cfg, lm=self.model, tokenizer=self.tokenizer, items=self._source_items)
        env._references = self._references  # the reference pass does not depend on the cache backend
        env._baselines = self._baselines  # keyed by every option a baseline pass depends on
        return env

    def reference_for(self, row: int) -> _Reference:
        """The full-precision reference (ending scores, predictions) of row ``row`` with its fixed shots."""
        item, prompt_ids, endings = self.episode_inputs(row)
        return self._reference(prompt_ids, endings, item)

    # --- snapshot / restore: search policies (agents.oracle) branch an episode at a block -----------
    def snapshot(self) -> EnvSnapshot:
        """The episode's state now (cache, observer, block index, last logits and observation, done,
        and the reward terms' per-episode state), deep-copied: continuing from :meth:`restore` of it
        gives bit-identical observations, rewards and info to the continuation from here.

        Why a copy of the state rather than a replay of the actions: a per-item search tries every
        setting at every block, and replaying the prefix for each would cost a quadratic number of
        block forwards. The full-precision reference, the item and its tokens are never modified, so
        they are shared, not copied. A snapshot can be restored any number of times, on this env only.
        The quanto cache cannot be copied (its quantized tensors refuse a deep copy): a clear error.
        """
        self._check_open()
        if self._episode is None:
            raise RuntimeError("snapshot() before reset(): there is no episode to snapshot")
        if self.config.cache == "quanto":
            raise ValueError("snapshot() cannot copy transformers' quanto cache (cache='quanto'); use cache='mixed' "
                             "(or 'dynamic') to branch episodes")
        return EnvSnapshot(id(self), self._copy_episode(self._episode), copy.deepcopy(self.reward_fn.terms))

    def restore(self, snapshot: EnvSnapshot) -> None:
        """Put the episode back to ``snapshot`` (from :meth:`snapshot` of this env); the snapshot stays
        usable, so one block can be branched several times."""
        self._check_open()
        if not isinstance(snapshot, EnvSnapshot):
            raise TypeError(f"restore() takes what snapshot() returned, got {type(snapshot).__name__}")
        if snapshot.env_id != id(self):
            raise ValueError("this snapshot was taken on another env; restore it on the env that took it")
        self._episode = self._copy_episode(snapshot.episode)
        self.reward_fn.terms = copy.deepcopy(snapshot.reward_terms)

    def _copy_episode(self, ep: _Episode) -> _Episode:
        """A deep copy of ``ep`` that shares what no step modifies (reference, item, tokens, the model's
        config, the env's feature set); tensors are cloned in inference mode, as the env made them."""
        shared = (ep.reference, ep.item, ep.prompt_ids, ep.endings, ep.blocks, self.feature_set, self.model,
                  self.model.config)
        memo: dict[int, Any] = {id(obj): obj for obj in shared}
        with torch.inference_mode():
            return copy.deepcopy(ep, memo)

    def step(self, action):
        commit = self._commit_action(action)
        ctx, scores, t_fwd = None, None, time.perf_counter()
        if not commit.terminal:
            ctx = self._run_block(self._episode.block_index)
        else:
            scores = self._score_current()
        return self._finish_step(commit, ctx, scores, time.perf_counter() - t_fwd)

    def _commit_action(self, action) -> _Commit:
        """Check the action and commit the pending block at its setting(s) (the first phase of a step).

        Three parts, so that the batched env can commit the rows that chose the same setting together
        (:meth:`stacked_setting`): plan, commit the cache, record."""
        commit = self._plan_commit(action)
        self._commit_block(commit)
        return self._committed(commit)

    def _plan_commit(self, action) -> _Commit:
        """Check the action and decide what the pending block is committed at, the budget enforced."""
        ep = self._episode
        self._check_open()
        if ep is None:
            raise RuntimeError("step() before reset()")
        if ep.done:
            raise RuntimeError("step() after the episode terminated: call reset()")
        indices, marks = self._check_action(action)
        requested = [self.bits[a] for a in indices]
        start, end = ep.blocks[ep.block_index]
        sinks = self.config.sink_tokens
        protect = None if marks is None else [m and start + i >= sinks for i, m in enumerate(marks[: end - start])]
        asked = 0 if protect is None else sum(protect)
        enforced = False
        if self.config.bit_budget is not None:  # layer_groups is 1 (EnvConfig.validate)
            allowed = fallback_action(self.bits, indices[0], self._settings_mask())
            enforced = allowed != indices[0]
            indices = [allowed]
            if asked:
                keep = protect_allowance(
                    self.bits, self.config.bit_budget, self.bits[allowed], self.protect_bits, start,
                    ep.committed_bit_sum, end - start, len(ep.prompt_ids) - end, sinks,
                )
                if keep < asked:  # the earliest marks are kept, the later ones dropped
                    enforced = True
                    marked = [i for i, m in enumerate(protect) if m]
                    for i in marked[keep:]:
                        protect[i] = False
        protected = 0 if protect is None else sum(protect)
        return _Commit(
            settings=[self.bits[a] for a in indices], t0=time.perf_counter(), before=ep.cache.nbytes(False),
            before_fp16=ep.cache.fp16_nbytes(False), block_tokens=ep.cache.pending_length, requested=requested,
            budget_enforced=enforced, protect=protect if protected else None, protected=protected,
            requested_protected=asked,
        )

    def stacked_setting(self, commit: _Commit) -> Setting | None:
        """The setting of a planned commit that :meth:`MixedPrecisionKVCache.commit_rows` can make together
        with other episodes' (one setting for every layer and token, on a mixed-precision cache); None when
        this episode commits on its own (:meth:`_commit_block`)."""
        plain = commit.protect is None and self.layer_groups == 1
        return commit.settings[0] if plain and isinstance(self._episode.cache, MixedPrecisionKVCache) else None

    def _commit_block(self, commit: _Commit) -> None:
        """Commit the episode's pending block as planned."""
        cache = self._episode.cache
        if commit.protect is not None:
            cache.commit(commit.settings[0], protect=commit.protect, protect_bits=self.protect_bits)
        elif self.layer_groups == 1:
            cache.commit(commit.settings[0])
        else:
            cache.commit_groups(commit.settings)

    def _committed(self, commit: _Commit) -> _Commit:
        """After the cache committed the block: its bytes and bits counted, the episode moved to the next block."""
        ep = self._episode
        settings = commit.settings
        start, end = ep.blocks[ep.block_index]
        sinks = self.config.sink_tokens
        commit.after, commit.after_fp16 = ep.cache.nbytes(False), ep.cache.fp16_nbytes(False)
        if commit.protected:
            ep.committed_bit_sum += block_bit_sum(settings[0], start, end, sinks, commit.protected, self.protect_bits)
        else:  # layer groups are equal-sized, so a block's bits are the mean over groups
            ep.committed_bit_sum += sum(block_bit_sum(s, start, end, sinks) for s in settings) / len(settings)
        ep.block_index += 1
        commit.terminal = ep.block_index >= len(ep.blocks)
        return commit

    def greedy_exact_match(self) -> bool:
        """After the terminal step: whether greedy decoding from the committed cache produces the gold
        answer (the task's ``answer_text``), decoding as many tokens as the gold continuation has.

        It runs inside ``cache.branch(1)``, which drops every token it adds, so the episode's cache,
        info and scores are unchanged (a metric of the episode, not part of it). Tasks without an exact
        match (``task.exact_match`` False, e.g. HellaSwag) raise."""
        self._check_open()
        ep = self._episode
        if not self.task.exact_match:
            raise ValueError(f"task {self.config.task!r} defines no exact match")
        if ep is None or not ep.done:
            raise RuntimeError("greedy_exact_match() needs a finished episode: step until it terminates first")
        n_tokens = len(ep.endings[ep.item.label])
        decoded: list[int] = []
        logits = ep.last_logits
        with torch.inference_mode(), ep.cache.branch(1):
            for i in range(n_tokens):
                decoded.append(int(logits.float().argmax()))
                if i + 1 < n_tokens:
                    ids = torch.tensor([[decoded[-1]]], device=self.model.device)
                    logits = self._forward(ids, ep.cache, attentions=False).logits[0, -1]
        return self.tokenizer.decode(decoded).strip() == self.task.answer_text(ep.item).strip()

    def block_spans(self) -> list[tuple[int, int]]:
        """``[start, end)`` token positions of the current episode's blocks (``interval`` tokens each, the
        last one shorter), in the order ``step`` commits them."""
        self._check_open()
        if self._episode is None:
            raise RuntimeError("block_spans() before reset(): blocks belong to an episode")
        return list(self._episode.blocks)

    def evidence_blocks(self) -> list[int]:
        """Indices of the current episode's blocks holding a token that overlaps any of the task's evidence
        (``Task.evidence``: the prompt text that carries the answer, e.g. the passkey needle), ascending.

        Privileged information: the task's generator knows where it put the answer; a policy never sees
        this (``agents.evidence`` plans with it, as a teacher on pool items or an evaluation-only row).
        Empty when the task has no evidence (HellaSwag). Characters are mapped to tokens with the
        tokenizer's offsets (fast tokenizers) or decoded prefixes (``envs.evidence``)."""
        self._check_open()
        ep = self._episode
        if ep is None:
            raise RuntimeError("evidence_blocks() before reset(): evidence belongs to an episode's prompt")
        hit = self.evidence_tokens()
        return [b for b, (start, end) in enumerate(ep.blocks) if any(hit[start:end])]

    def evidence_tokens(self) -> list[bool]:
        """One bool per prompt token of the current episode: whether it overlaps the task's evidence (the
        token-level :meth:`evidence_blocks`; privileged, for teachers and labels only). All False without
        evidence (HellaSwag)."""
        self._check_open()
        ep = self._episode
        if ep is None:
            raise RuntimeError("evidence_tokens() before reset(): evidence belongs to an episode's prompt")
        evidence = self.task.evidence(ep.item)
        if not evidence:
            return [False] * len(ep.prompt_ids)
        spans = evidence_char_spans(ep.context, evidence)
        return overlapping_tokens(token_char_spans(self.tokenizer, ep.context, ep.prompt_ids), spans)

    def action_masks(self) -> np.ndarray:
        """Bool mask over the actions (sb3-contrib's MaskablePPO convention): True for every setting that,
        committed for the pending block, keeps ``bit_budget`` reachable with the cheapest setting for every
        later block (``envs.budget.feasible_mask``). All True without a budget, before reset and after the
        episode ended; never all False. With ``layer_groups > 1`` (never with a budget): the per-group
        masks concatenated, ``len(bits) * layer_groups`` entries. With ``protect_bits``: the settings' mask
        (for the block with nothing marked), then ``[may leave, may mark]`` per token slot (a slot past the
        block's end may only be left; the budget's trim of marks is the env's, after the action)."""
        settings = self._settings_mask()
        if self.protect_bits is None:
            return settings
        ep = self._episode
        slots = np.ones((self.config.interval, 2), dtype=bool)
        if ep is not None and not ep.done:
            start, end = ep.blocks[ep.block_index]
            slots[end - start :, 1] = False
        return np.concatenate([settings, slots.reshape(-1)])

    def _settings_mask(self) -> np.ndarray:
        """The settings' part of :meth:`action_masks` (what the budget allows for the pending block)."""
        ep = self._episode
        budget = self.config.bit_budget
        if budget is None or ep is None or ep.done:
            return np.ones(len(self.bits) * self.layer_groups, dtype=bool)
        start, end = ep.blocks[ep.block_index]
        return feasible_mask(
            self.bits, budget, start, ep.committed_bit_sum, end - start, len(ep.prompt_ids) - end,
            self.config.sink_tokens,
        )

    def _score_current(self) -> np.ndarray:
        """The terminal phase: score the endings against the episode's (now fully committed) cache."""
        ep = self._episode
        scores = self._score_endings(ep.cache, ep.prompt_ids, ep.last_logits, ep.endings)
        ep.done = True
        return scores

    def _finish_step(
        self, commit: _Commit, ctx: BlockContext | None, scores: np.ndarray | None, forward_seconds: float
    ):
        """Observation, reward and info of a step whose block was run (``ctx``) or endings scored (``scores``)."""
        ep = self._episode
        settings, terminal = commit.settings, commit.terminal
        after, after_fp16 = commit.after, commit.after_fp16
        names = [setting_name(s) for s in settings]
        pairs = [s if isinstance(s, tuple) else (s, s) for s in settings]
        info: dict[str, Any] = {
            "bits": settings[0] if self.layer_groups == 1 else settings,  # int or (key_bits, value_bits)
            "setting": names[0] if self.layer_groups == 1 else names,  # canonical names: "4", "k4v2"
            # bit_budget (envs.budget): whether the setting asked for was replaced, and what it was
            "budget_enforced": commit.budget_enforced,
            "requested_setting": (
                setting_name(commit.requested[0]) if self.layer_groups == 1
                else [setting_name(s) for s in commit.requested]
            ),
            "key_bits": [k for k, _ in pairs],
            "value_bits": [v for _, v in pairs],
            "row": ep.item.row,
        }
        if self.protect_bits is not None:  # tokens kept at protect_bits (after the budget), and those marked
            info["protected_tokens"] = commit.protected
            info["requested_protected_tokens"] = commit.requested_protected
        if not terminal:
            obs = self._observe(ctx)
            start, end = ep.blocks[ep.block_index]
            info["tokens"] = end - start
            forward_ms = 1000 * ctx.forward_seconds
        else:
            obs = ep.last_obs.copy()  # a new array: the passive checker flags a reused one
            forward_ms = 1000 * forward_seconds
        record = StepRecord(
            bits=ep.cache.block_bits[-1][0],
            max_bits=FULL_BITS,
            block_tokens=commit.block_tokens,
            block_nbytes=after - commit.before,
            block_fp16_nbytes=after_fp16 - commit.before_fp16,
            cache_nbytes=after,
            cache_fp16_nbytes=after_fp16,
            avg_bits=ep.cache.average_bits(),
            step_seconds=time.perf_counter() - commit.t0,
            terminal=terminal,
        )
        step = self._step_view(record, ctx, scores)
        if terminal:
            pred, pred_norm = step["choice"]
            gold = ep.item.label
            info.update(
                tokens=sum(len(e) for e in ep.endings),
                scores=[float(s) for s in scores],
                pred=int(pred),
                pred_norm=int(pred_norm),
                gold=int(gold),
                correct=bool(pred == gold),
                correct_norm=bool(step["correct_norm"]),
                reference_correct=bool(ep.reference.pred == gold),
                reference_correct_norm=bool(step["reference_correct_norm"]),
                loglik_delta=step["ending_logprob_delta"],
                avg_bits=record.avg_bits,
                kv_bytes=after,
                fp16_kv_bytes=after_fp16,
            )
        reward, terms = self.reward_fn(step)
        info["rewards"] = terms
        # Timings are kept out of ``info`` so that same seed -> same info (Gymnasium's determinism check).
        self.timings = {"forward_ms": forward_ms, "step_ms": 1000 * record.step_seconds, "tokens": info["tokens"]}
        return obs, reward, terminal, False, info

    def close(self) -> None:
        """Drop the model and the episode; safe to call twice."""
        self._episode = None
        self._references = OrderedDict()  # rebound, not cleared: a sibling may share it
        self._baselines = OrderedDict()
        self._loaded = None
        self._closed = True

    # --- internals ----------------------------------------------------------------------------
    def _step_view(
        self, record: StepRecord | None, block: BlockContext | None, ending_scores: np.ndarray | None = None
    ) -> StepView:
        """What reward terms may read about this step; ``block`` is the block just run (None at the end)."""
        ep = self._episode
        state = StepState(
            model=self.model,
            item=ep.item,
            cache=ep.cache,
            reference=ep.reference,
            next_block=block,
            next_span=ep.blocks[ep.block_index] if block is not None else None,
            ending_scores=ending_scores,
            baseline_scores=self.baseline_scores,
            task=self.task,
        )
        return StepView(record, state)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the environment is closed")

    def _check_action(self, action) -> tuple[list[int], list[bool] | None]:
        """Menu indices of an action (one, or one per layer group) and, with ``protect_bits``, the token marks."""
        if self.protect_bits is not None:
            slots = self.config.interval
            try:
                raw = np.asarray(action).reshape(1 + slots)
                values = [int(a) for a in raw]
            except (TypeError, ValueError):
                raise ValueError(
                    f"action must be {1 + slots} integers: a setting in [0, {len(self.bits)}), then a 0/1 mark per "
                    f"token slot; got {action!r}"
                ) from None
            if any(v != a for v, a in zip(values, raw, strict=True)) or not 0 <= values[0] < len(self.bits) or any(
                v not in (0, 1) for v in values[1:]
            ):
                raise ValueError(f"action {action!r} outside the action space {self.action_space} (bits {self.bits})")
            return [values[0]], [bool(v) for v in values[1:]]
        groups = self.layer_groups
        what = (
            f"an integer in [0, {len(self.bits)})" if groups == 1
            else f"{groups} integers in [0, {len(self.bits)}), one per layer group"
        )
        try:
            raw = np.asarray(action)
            flat = raw.reshape(()) if groups == 1 else raw.reshape(groups)
            indices = [int(a) for a in np.atleast_1d(flat)]
        except (TypeError, ValueError):
            raise ValueError(f"action must be {what}, got {action!r}") from None
        if any(i != a for i, a in zip(indices, np.atleast_1d(flat), strict=True)) or not all(
            0 <= i < len(self.bits) for i in indices
        ):
            raise ValueError(f"action {action!r} outside the action space {self.action_space} (bits {self.bits})")
        return indices, None

    def _tokenize(self, item: TaskItem, shots: list[TaskItem]) -> tuple[list[int], list[list[int]], int, str]:
        """Prompt ids, ending ids (as lm-eval forms them), the shots kept and the context text the prompt ids
        encode: earliest shots past the limit are dropped."""
        limit = min(self.config.max_prompt_tokens, _max_positions(self.model))
        shots = list(shots)
        while True:
            context = self.task.context(item, shots)
            pairs = [encode_pair(self.tokenizer, context, cont) for cont in self.task.continuations(item)]
            prompt_ids = pairs[0][0]
            longest = max(len(cont) for _, cont in pairs)
            if len(prompt_ids) + longest <= limit:
                return list(prompt_ids), [list(cont) for _, cont in pairs], len(shots), context
            if not shots:
                raise ValueError(
                    f"row {item.row}: prompt ({len(prompt_ids)} tokens) + ending ({longest}) exceed the limit "
                    f"of {limit} tokens (max_prompt_tokens and the model's context) even with no shots"
                )
            shots.pop(0)

    def _new_cache(self, bits: Sequence[Setting] | None = None, tokens: int = 0) -> EpisodeCache:
        """A fresh episode cache of the env's kind over ``bits`` (default: the menu); ``tokens``: how many the
        episode will hold (the prompt and its endings, packed for scoring), so the kept floats are allocated once.

        Our cache keeps its committed prefix dequantized (``keep_dequantized``): every block forward
        and the endings' scoring copy it instead of dequantizing every segment again, with the same
        numbers; the price is the committed tokens' floats held for the episode (``kv_bytes`` still
        counts only the stored codes)."""
        return episode_cache(
            self.config.cache, self.model, self.bits if bits is None else bits, self.config.group_size,
            self.config.sink_tokens, keep_dequantized=True, rotate_keys=self.config.rotate_keys,
            rotate_values=self.config.rotate_values, expected_tokens=tokens,
        )

    def _forward(self, input_ids: torch.Tensor, cache: EpisodeCache, attentions: bool):
        with torch.inference_mode():
            return self.model(
                input_ids=input_ids, **with_cache(self.model, cache), use_cache=True, output_attentions=attentions
            )

    def _run_block(self, index: int) -> BlockContext:
        ids = self._block_ids(index)
        saliency = None
        t0 = time.perf_counter()
        if "saliency" in self.forward_needs:
            out, saliency = self._forward_with_saliency(ids, self._episode.cache)
        else:
            out = self._forward(ids, self._episode.cache, "attentions" in self.forward_needs)
        seconds = time.perf_counter() - t0
        return self._block_context(index, out.logits[0], getattr(out, "attentions", None), saliency, seconds)

    def _block_ids(self, index: int) -> torch.Tensor:
        """[1, T] token ids of block ``index`` of the episode."""
        return torch.tensor(self._block_tokens(index), device=self.model.device).unsqueeze(0)

    def _block_tokens(self, index: int) -> list[int]:
        """The token ids of block ``index`` of the episode."""
        start, end = self._episode.blocks[index]
        return list(self._episode.prompt_ids[start:end])

    def _block_targets(self, index: int) -> list[int]:
        """Each token's next token in block ``index`` of the episode (-1 for the prompt's last: none follows)."""
        start, end = self._episode.blocks[index]
        known = self._episode.prompt_ids[start + 1 : end + 1]
        return known + [-1] * (end - start - len(known))

    def _block_context(
        self, index: int, logits: torch.Tensor, attentions, saliency: torch.Tensor | None, seconds: float,
        batch_values: dict[str, torch.Tensor] | None = None, logit_stats: tuple[LogitStats, int] | None = None,
    ) -> BlockContext:
        """The context of block ``index`` once the model has run it: ``logits`` [T, V], per-layer
        ``attentions`` [1, heads, T, S] (or None), with its keys/values pending in the episode's cache;
        ``batch_values`` and ``logit_stats``: what a batched forward computed for several rows at once
        (``BlockContext``; the targets are then the stats' own)."""
        ep = self._episode
        ep.last_logits = logits[-1]
        if logit_stats is None:
            targets = torch.tensor(self._block_targets(index), device=logits.device)
        else:
            stats, offset = logit_stats
            targets = stats.targets[offset : offset + len(logits)]
        return ep.observer.context(
            torch.tensor(self._block_tokens(index), device=logits.device), logits, targets, ep.cache,
            attentions=attentions, saliency=saliency, forward_seconds=seconds, batch_values=batch_values,
            logit_stats=logit_stats,
        )

    def _forward_with_saliency(self, ids: torch.Tensor, cache: MixedPrecisionKVCache):
        """Forward with input gradients: |d max log-prob / d embedding| per token (a backward pass)."""
        embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.model(
                inputs_embeds=embeds,
                **with_cache(self.model, cache),
                use_cache=True,
                output_attentions="attentions" in self.forward_needs,
            )
            top = torch.log_softmax(out.logits[0].float(), -1).max(-1).values.sum()
            (grad,) = torch.autograd.grad(top, embeds)
        for layer in cache.layers:  # the pending buffer must not keep the graph alive
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        out.logits = out.logits.detach()
        if getattr(out, "attentions", None) is not None:
            out.attentions = tuple(a.detach() for a in out.attentions)
        return out, grad[0].norm(dim=-1)

    def _observe(self, ctx: BlockContext) -> np.ndarray:
        obs = self._episode.observer.observe(ctx)
        self._episode.last_obs = obs
        return obs

    def _score_endings(
        self, cache: EpisodeCache, prompt_ids: list[int], last_logits: torch.Tensor, endings: list[list[int]]
    ) -> np.ndarray:
        """Summed log-prob of each ending given the cached prompt: in one forward of one packed row where
        the cache can branch and the model allows packing (envs.scoring), else in as few batched
        forwards as the cache allows (quanto: one per ending)."""
        if cache.branch_limit is None and self._pack_endings:
            with torch.inference_mode(), cache.branch(1):
                scores = continuation_logprobs(
                    self.model, prompt_ids, endings, cache=cache, prefix_last_logits=last_logits
                )
            return np.asarray(scores, dtype=np.float64)
        width = cache.branch_limit or len(endings)
        scores: list[float] = []
        for first in range(0, len(endings), width):
            group = endings[first : first + width]
            with torch.inference_mode(), cache.branch(len(group)):
                scores += continuation_logprobs(
                    self.model, prompt_ids, group, cache=cache, prefix_last_logits=last_logits
                )
        return np.asarray(scores, dtype=np.float64)

    def _reference(self, prompt_ids: list[int], endings: list[list[int]], item: TaskItem) -> _Reference:
        key = (*prompt_ids, -1, *[t for e in endings for t in (*e, -2)])
        ref = self._references.get(key)
        if ref is not None:
            self._references.move_to_end(key)
            return ref
        if self.reference_store is None:
            ref = self._compute_reference(prompt_ids, endings, item)
        else:
            store_key = self._store_key(prompt_ids, endings)
            stored = self.reference_store.load(store_key)
            if stored is None:
                ref = self._compute_reference(prompt_ids, endings, item)
                self.reference_store.save(store_key, _reference_tensors(ref))
            else:
                ref = _Reference(
                    stored["target_logprobs"].to(self.model.device),
                    stored["ending_scores"].numpy(),
                    int(stored["preds"][0]),
                    int(stored["preds"][1]),
                )
        self._references[key] = ref
        if len(self._references) > self.config.reference_cache_size:
            self._references.popitem(last=False)
        return ref

    def _compute_reference(self, prompt_ids: list[int], endings: list[list[int]], item: TaskItem) -> _Reference:
        """The full-precision pass of one prompt (one forward + the endings), on the model's device."""
        device = self.model.device
        cache = MixedPrecisionKVCache(config=self.model.config, group_size=self.config.group_size)
        out = self._forward(torch.tensor(prompt_ids, device=device).unsqueeze(0), cache, attentions=False)
        logits = out.logits[0]
        # gather - logsumexp: a full [P, vocab] log_softmax would be the largest tensor of the episode
        head = logits[:-1].float()
        picked = head.gather(-1, torch.tensor(prompt_ids[1:], device=device).unsqueeze(-1)).squeeze(-1)
        target_lp = picked - torch.logsumexp(head, dim=-1)
        scores = self._score_endings(cache, prompt_ids, logits[-1], endings)
        pred, pred_norm = self.task.choose(item, scores.tolist())
        return _Reference(target_lp, scores, int(pred), int(pred_norm))

    # --- baseline passes: every block at one fixed setting --------------------------------------
    def baseline_scores(self, setting: BlockBits | str) -> np.ndarray:
        """[n_endings] summed log-probs of the current episode's endings when every block of its prompt
        is committed at ``setting`` (an int, a (key_bits, value_bits) pair or a name such as "k4v2";
        it need not be on the menu), with every layer group alike.

        It runs what a fixed policy's episode runs: the episode's blocks, a fresh cache of the env's
        kind with its sink tokens and group size, and the same scoring (``_score_endings``); so the
        fixed policy scores exactly these numbers and its ``baseline_improvement`` is exactly 0. An
        env's ``bit_budget`` plays no part (the baseline is the named setting as is). Computed once per
        prompt, setting and those options, kept in memory (shared with siblings) and stored with the
        full-precision references under the same fingerprint.
        """
        self._check_open()
        ep = self._episode
        if ep is None:
            raise RuntimeError("baseline_scores() before reset(): the baseline is of the current episode's prompt")
        setting = normalize_setting(setting)
        check_cache_bits(self.config.cache, (setting,), self.config.sink_tokens, self.layer_groups)
        variant = self._baseline_variant(setting)
        key = (variant, *ep.prompt_ids, -1, *[t for e in ep.endings for t in (*e, -2)])
        scores = self._baselines.get(key)
        if scores is not None:
            self._baselines.move_to_end(key)
            return scores.copy()
        store_key = None
        if self.reference_store is not None:
            store_key = dataclasses.replace(self._store_key(ep.prompt_ids, ep.endings), variant=variant)
            stored = self.reference_store.load(store_key)
            if stored is not None:
                scores = stored["ending_scores"].numpy()
        if scores is None:
            scores = self._compute_baseline(setting, ep.prompt_ids, ep.blocks, ep.endings)
            if store_key is not None:
                self.reference_store.save(store_key, {"ending_scores": torch.from_numpy(scores)})
        self._baselines[key] = scores
        if len(self._baselines) > self.config.reference_cache_size:
            self._baselines.popitem(last=False)
        return scores.copy()

    def _baseline_variant(self, setting: Setting) -> str:
        """What a baseline pass depends on beyond the model and the tokens (the store key's ``variant``):
        the setting, the cache backend, the fp16 sink tokens, the block boundaries, the quantization
        group and rotation (named only when on, so the keys stored before those options stay valid). Layer
        groups are not in it: every group takes the setting, which is the one-group commit."""
        cfg = self.config
        return (
            f"baseline|setting={setting_name(setting)}|cache={cfg.cache}|sink_tokens={cfg.sink_tokens}"
            f"|interval={cfg.interval}|group_size={cfg.group_size}"
            + ("|rotate_keys" if cfg.rotate_keys else "") + ("|rotate_values" if cfg.rotate_values else "")
        )

    def _compute_baseline(
        self, setting: Setting, prompt_ids: list[int], blocks: list[tuple[int, int]], endings: list[list[int]]
    ) -> np.ndarray:
        """One fixed-setting pass: run each block, commit it at ``setting``, then score the endings.

        The forward is the policy's (``_forward``) without attention maps: eager attention computes the
        same numbers whether or not it returns them (tests/envs/test_baseline_reward.py checks that the
        baseline policy's own improvement is exactly 0 with the default, attention-reading features)."""
        cache = self._new_cache((setting,))
        last_logits = None
        for start, end in blocks:
            ids = torch.tensor(prompt_ids[start:end], device=self.model.device).unsqueeze(0)
            last_logits = self._forward(ids, cache, attentions=False).logits[0, -1]
            cache.commit(setting)
        return self._score_endings(cache, prompt_ids, last_logits, endings)

    def _store_key(self, prompt_ids: list[int], endings: list[list[int]]) -> ReferenceKey:
        """What a stored reference depends on: the model (spec, weight quantization and the weights
        themselves, since ``lm=`` may pass any model), its dtype and device type, the tokens, and the
        fingerprint of what computes it (envs.fingerprint)."""
        model = self.model
        return ReferenceKey(
            model=f"{self.config.model}|{self.config.weight_quant}|{model_digest(model)}",
            dtype=str(model.dtype).removeprefix("torch."),
            device=model.device.type,
            tokens=tokens_digest(prompt_ids, endings),
            fingerprint=process_fingerprint_id(model.device, model.dtype),
            scoring=CACHED_SCORING if self._pack_endings else "rows",
        )


def _reference_tensors(ref: _Reference) -> dict[str, torch.Tensor]:
    """The stored form of a reference: CPU tensors (float64 scores and int64 predictions keep them exact)."""
    return {
        "target_logprobs": ref.target_logprobs.detach().cpu(),
        "ending_scores": torch.from_numpy(np.asarray(ref.ending_scores, dtype=np.float64)),
        "preds": torch.tensor([ref.pred, ref.pred_norm], dtype=torch.int64),
    }


def _num_layers(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


def _max_positions(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "max_position_embeddings", 1 << 30))
