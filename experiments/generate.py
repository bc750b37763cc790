"""Generate text with a mixed-precision KV cache whose bits a policy picks every ``interval`` tokens.

    python -m experiments.generate --set policy=mlp:runs/train_mlp/mlp.pt --set max_new_tokens=200

The model is loaded as the env would (``env.model``, ``env.dtype``, ``env.weight_quant``) and decodes with
``quant.kv_cache.MixedPrecisionKVCache(policy=hook, interval=env.interval)``. Whenever ``interval`` or more
tokens are pending at the start of a forward, ``hook(cache)`` builds the policy's observation for those
tokens and returns the bits they are committed at. Observations are the env's (same names, same order,
same ``envs.observation.BlockObserver`` as the env's steps): forward hooks on the model record each
forward's input tokens, logits and attention maps, and the pending tokens are observed as one env block:

- token_acc: the probability of the token that actually came next (the generated one), as in the env.
- attn_var: from the attention maps of the forwards that produced the block (decode steps see one query
  row each; rows are zero-padded to the longest key length, which leaves the variance sum unchanged).
- rarity: a running token frequency over the whole generation (prompt included).
- state features from the cache; ``progress`` uses the expected number of blocks,
  ``ceil((prompt + max_new_tokens) / interval)``, since the final length is not known in advance.
- Features that need input gradients (saliency) are not available during generation.

The first block is the whole prompt (prefilled in one forward, so it is committed at the first decision,
even if longer than ``interval``); tokens still pending at the end are never committed (they stay
full-precision) and are not in ``avg_bits``. Prints each text, tokens/s, average bits and KV bytes vs
fp16; writes ``<out_dir>/generate.json``.

Under ``env.bit_budget`` the hook passes the env's masks (``envs.budget.feasible_mask``) to the policy and
falls back as the env does, over the tokens the generation commits: it runs all ``max_new_tokens`` (set
``min_new_tokens`` to the same), so the blocks still to come are known, and the uncommitted tail is not
counted, exactly as ``avg_bits`` counts.

Degeneration, per text: ``rep_4`` (the fraction of the continuation's token 4-grams that repeat an
earlier one: 0 for fresh text, near 1 for a loop) and ``fp16_ppl`` (the perplexity of the continuation
under the same model with a full-precision cache, prompt included: how plausible the text is to the
model that was not quantized; a loop scores *low* perplexity, so read the two together). ``compare``
runs further policies on the same prompts and prints one table: fixed settings at the learned policy's
average bits are the comparison the learning issue asks for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import wandb
from tqdm.auto import tqdm

from agents.registry import make_policy
from envs.budget import block_bit_sum, fallback_action, feasible_mask
from envs.cache_kwarg import with_cache
from envs.features import FeatureSet, TokenVocabulary
from envs.kv_precision import EnvConfig
from envs.model import load_model
from envs.observation import BlockObserver
from envs.scoring import score_requests
from envs.settings import normalize_setting
from experiments import tracking
from experiments.config import parse_config, save_config
from experiments.io import seed_everything, write_json
from quant.kv_cache import MixedPrecisionKVCache
from quant.weights import quantize_model_weights

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain quantization in LLMs in one paragraph.",
    "Write a short description of Scooby-Doo and the Mystery Inc. gang.",
    "Explain the process of photosynthesis in one paragraph.",
)
SUPPORTED_NEEDS = frozenset({"attentions", "vocab", "cache"})


@dataclass
class GenerateConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # model, dtype, weight_quant, bits, features, interval, group_size
    policy: str = "rule"  # fixed:4, rule, rule:<yaml>, mlp:<path>, sb3:<path>
    compare: tuple[str, ...] = ()  # further policies on the same prompts, side by side (e.g. fixed settings)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    chat_template: bool = True  # wrap each prompt as a user turn when the tokenizer has a template
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False  # greedy by default (reproducible)
    temperature: float = 0.7  # only with do_sample
    top_p: float = 0.9  # only with do_sample
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None = torch's default)
    # keep the committed prefix dequantized too (quant.kv_cache): decoding as fast as a DynamicCache,
    # the same tokens, but the committed tokens' floats are held on top of the codes (kv bytes count the codes)
    keep_dequantized: bool = False
    # hand attention the committed tokens grouped by bit-width (quant.kv_cache, reorder_prefix): the same
    # attention up to float rounding (one prompt at a time, no padding), a few ops per width on each read
    # instead of a copy per block; false reads them in token order
    reorder_prefix: bool = True
    out_dir: str = "runs/generate"
    wandb_project: str = "kvgym"
    wandb_group: str | None = None
    progress: bool = True


class FeatureTracker:
    """Records each forward of a generating model; turns the tokens pending in the cache into an observation.

    Only the recording is generation's own: the observation is the env's, through the same
    :class:`~envs.observation.BlockObserver` (``n_blocks`` is the expected number of blocks).
    """

    def __init__(self, feature_set: FeatureSet, n_blocks: int = 1, vocab: TokenVocabulary | None = None):
        unsupported = feature_set.needs - SUPPORTED_NEEDS
        if unsupported:
            raise ValueError(
                f"features needing {sorted(unsupported)} cannot be computed during generation; "
                "drop them from env.features"
            )
        self.feature_set = feature_set
        if "vocab" in feature_set.needs and vocab is None:
            raise ValueError("features needing the tokenizer's vocabulary (digits) need vocab=TokenVocabulary(...)")
        self.observer = BlockObserver(feature_set, n_blocks, vocab)
        self.needs_attentions = "attentions" in feature_set.needs
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None, float]] = []
        self.incoming: torch.Tensor | None = None
        self._t0 = 0.0

    # --- forward hooks ------------------------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("generation must feed input_ids (inputs_embeds cannot be tracked)")
        self.incoming = ids[0].detach().clone()
        self._t0 = time.perf_counter()
        if self.needs_attentions:
            kwargs["output_attentions"] = True
        return args, kwargs

    def post_hook(self, module, args, kwargs, out):
        seconds = time.perf_counter() - self._t0
        n = len(self.incoming)
        logits = out.logits[0, -n:].detach().float()
        if logits.shape[0] != n:
            raise RuntimeError(f"the forward returned logits for {logits.shape[0]} of its {n} tokens")
        attn = None
        if self.needs_attentions:
            if getattr(out, "attentions", None) is None:
                raise RuntimeError("attn_var needs attention maps: load the model with attn_implementation='eager'")
            attn = tuple(a.detach() for a in out.attentions)
        self.chunks.append((self.incoming, logits, attn, seconds))

    @contextmanager
    def attached(self, model):
        handles = [model.register_forward_pre_hook(self.pre_hook, with_kwargs=True),
                   model.register_forward_hook(self.post_hook, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    # --- observation --------------------------------------------------------------------------
    def _attentions(self) -> tuple[torch.Tensor, ...] | None:
        if not self.needs_attentions:
            return None
        width = max(c[2][0].shape[-1] for c in self.chunks)
        layers = len(self.chunks[0][2])
        return tuple(
            torch.cat([torch.nn.functional.pad(c[2][i], (0, width - c[2][i].shape[-1])) for c in self.chunks], dim=2)
            for i in range(layers)
        )

    def observe(self, cache: MixedPrecisionKVCache) -> np.ndarray:
        """Features of the pending tokens (the block about to be committed); forgets them afterwards."""
        ids = torch.cat([c[0] for c in self.chunks])
        if len(ids) != cache.pending_length:
            raise RuntimeError(f"tracked {len(ids)} tokens but the cache holds {cache.pending_length} pending")
        ctx = self.observer.context(
            ids,
            torch.cat([c[1] for c in self.chunks]),
            torch.cat([ids[1:], self.incoming[:1]]),  # the token entering now follows the block
            cache,
            attentions=self._attentions(),
            forward_seconds=sum(c[3] for c in self.chunks),
        )
        obs = self.observer.observe(ctx)
        self.chunks.clear()
        return obs


@dataclass
class GenerationBudget:
    """The env's bit budget over the tokens a generation commits (``envs.budget``, as the env applies it).

    Which later blocks get committed is known once the length is: the first decision commits the tokens
    pending then (the prompt), every later one exactly ``interval`` tokens, and a block is committed at the
    start of the forward that feeds the token after it, so of ``fed`` tokens (prompt + new - 1: the last new
    token is never fed back) the ones after position ``end`` fill ``(fed - 1 - end) // interval`` blocks.
    """

    menu: tuple
    budget: float
    sink_tokens: int
    interval: int
    fed: int
    committed: int = 0
    bit_sum: float = 0.0

    def mask(self, pending: int) -> np.ndarray:
        end = self.committed + pending
        later = self.interval * max(0, (self.fed - 1 - end) // self.interval)
        mask = feasible_mask(self.menu, self.budget, self.committed, self.bit_sum, pending, later, self.sink_tokens)
        if not mask.any():
            raise ValueError(f"bit_budget {self.budget} cannot be met by this generation ({self.fed} tokens, "
                             f"{self.sink_tokens} fp16 sink tokens); raise the budget or max_new_tokens")
        return mask

    def commit(self, setting, pending: int) -> None:
        self.bit_sum += block_bit_sum(setting, self.committed, self.committed + pending, self.sink_tokens)
        self.committed += pending


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> torch.Tensor:
    """``[1, P]`` ids; a user turn of the tokenizer's chat template when it has one (instruct models)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(text, return_tensors="pt").input_ids


def generate_one(model, tokenizer, policy, prompt: str, cfg: GenerateConfig) -> dict[str, Any]:
    """Decode one prompt under ``policy``; the record written to generate.json."""
    bits = tuple(cfg.env.bits)
    ids = encode_prompt(tokenizer, prompt, cfg.chat_template).to(model.device)
    n_blocks = max(1, math.ceil((ids.shape[1] + cfg.max_new_tokens) / cfg.env.interval))
    feature_set = FeatureSet(cfg.env.features)
    vocab = TokenVocabulary.from_tokenizer(tokenizer) if "vocab" in feature_set.needs else None
    tracker = FeatureTracker(feature_set, n_blocks, vocab)
    decisions: list[dict[str, Any]] = []
    menu = tuple(normalize_setting(b) for b in bits)
    budget = None if cfg.env.bit_budget is None else GenerationBudget(
        menu, cfg.env.bit_budget, cfg.env.sink_tokens, cfg.env.interval, ids.shape[1] + cfg.max_new_tokens - 1)

    def hook(cache: MixedPrecisionKVCache) -> int:
        tokens = cache.pending_length
        obs = tracker.observe(cache)
        if budget is None:
            action, _ = policy.predict(obs, deterministic=True)
        else:
            mask = budget.mask(tokens)
            action, _ = policy.predict(obs, deterministic=True, action_masks=mask)
            action = fallback_action(menu, int(action), mask)
            budget.commit(menu[action], tokens)
        chosen = bits[int(action)]
        decisions.append({"block": len(decisions), "tokens": tokens, "bits": chosen,
                          "obs": dict(zip(tracker.feature_set.observation_names, obs.tolist(), strict=True))})
        return chosen

    cache = MixedPrecisionKVCache(config=model.config, group_size=cfg.env.group_size, policy=hook,
                                  interval=cfg.env.interval, sink_tokens=cfg.env.sink_tokens,
                                  keep_dequantized=cfg.keep_dequantized, rotate_keys=cfg.env.rotate_keys,
                                  rotate_values=cfg.env.rotate_values, reorder_prefix=cfg.reorder_prefix)
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.do_sample else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with torch.inference_mode(), tracker.attached(model):
        if ids.shape[1] > 1:  # prefill all but the last prompt token ourselves: generate() keeps only last logits
            model(input_ids=ids[:, :-1], **with_cache(model, cache), use_cache=True)
        out = model.generate(ids, **with_cache(model, cache), max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.min_new_tokens, do_sample=cfg.do_sample, pad_token_id=pad,
                             **sampling)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    committed_fp16 = cache.fp16_nbytes(False)
    pad_id = pad if pad is not None else 0
    nll = (-score_requests(model, [(ids[0].tolist(), new.tolist())], pad_id=pad_id)[0] / len(new)) if len(new) else float("nan")
    return {
        "prompt": prompt,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "token_ids": new.tolist(),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(len(new)),
        "seconds": seconds,
        "tokens_per_s": len(new) / seconds if seconds > 0 else float("nan"),
        "avg_bits": cache.average_bits(),
        "block_bits": [list(b) for b in cache.block_bits],
        "kv_bytes": cache.nbytes(),
        "fp16_kv_bytes": cache.fp16_nbytes(),
        "kv_ratio": cache.nbytes() / max(cache.fp16_nbytes(), 1),
        "committed_kv_bytes": cache.nbytes(False),
        "committed_fp16_kv_bytes": committed_fp16,
        "committed_kv_ratio": cache.nbytes(False) / committed_fp16 if committed_fp16 else float("nan"),
        "pending_tokens": cache.pending_length,
        "rep_4": repeated_ngram_fraction(new.tolist(), 4),
        "fp16_ppl": math.exp(nll) if not math.isnan(nll) else float("nan"),
        "decisions": decisions,
    }


def repeated_ngram_fraction(ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the ``n``-grams of ``ids`` that already occurred earlier in ``ids`` (0 with fewer than n+1 tokens)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def run(cfg: GenerateConfig) -> dict[str, Path]:
    """Generate for every prompt, print and save the results; returns the paths written."""
    if not cfg.prompts:
        raise ValueError("no prompts: pass --set prompts='[\"...\"]' or keep the defaults")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    cfg.env.validate()
    if cfg.env.bit_budget is not None and cfg.min_new_tokens < cfg.max_new_tokens:
        raise ValueError(f"a bit budget plans over every block the generation will commit: set min_new_tokens to "
                         f"max_new_tokens ({cfg.max_new_tokens}), got {cfg.min_new_tokens}")
    if cfg.env.protect_bits is not None or cfg.env.token_features:
        raise ValueError(
            "generate drives the cache one setting per block; per-token marks (env.protect_bits, env.token_features) "
            "are not supported while generating yet: set them to null and []"
        )
    seed_everything(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    feature_set = FeatureSet(cfg.env.features)
    specs = list(dict.fromkeys([cfg.policy, *cfg.compare]))
    policies = [make_policy(spec, observation_names=feature_set.observation_names, bits=cfg.env.bits) for spec in specs]
    model, tokenizer = load_model(
        cfg.env.model, dtype=cfg.env.dtype, device=cfg.env.device, attn_implementation="eager"
    )
    quantize_model_weights(model, cfg.env.weight_quant)
    paths = {"config": save_config(cfg, out_dir / "config.yaml")}
    wb = tracking.init_run(project=cfg.wandb_project, group=cfg.wandb_group, name=f"generate-{policies[0].name}",
                           config=cfg, job_type="generate", dir=out_dir)
    results = []
    try:
        for spec, policy in zip(specs, policies, strict=True):
            for prompt in tqdm(cfg.prompts, desc=f"generate ({policy.name})", unit="prompt", disable=not cfg.progress):
                rec = {"policy": spec, **generate_one(model, tokenizer, policy, prompt, cfg)}
                results.append(rec)
                avg = "n/a (nothing committed)" if math.isnan(rec["avg_bits"]) else f"{rec['avg_bits']:.2f}"
                print(f"\n### [{spec}] {prompt}\n{rec['text']}\n--- {rec['new_tokens']} tokens, "
                      f"{rec['tokens_per_s']:.1f} tok/s, avg bits {avg}, blocks {rec['block_bits']}, KV {rec['kv_bytes']} B "
                      f"vs fp16 {rec['fp16_kv_bytes']} B ({rec['kv_ratio']:.3f}; committed {rec['committed_kv_ratio']:.3f}), "
                      f"rep-4 {rec['rep_4']:.2f}, fp16 ppl {rec['fp16_ppl']:.2f}")
        summary = summarize_generations(results)
        print_summary(summary)
        paths["results"] = write_json(out_dir / "generate.json",
                                      {"policy": cfg.policy, "compare": list(cfg.compare), "summary": summary,
                                       "results": results})
        keys = ("policy", "prompt", "text", "new_tokens", "tokens_per_s", "avg_bits", "kv_ratio", "committed_kv_ratio",
                "rep_4", "fp16_ppl")
        wb.log({"generations": wandb.Table(columns=list(keys), data=[[r[k] for k in keys] for r in results])})
        wb.summary.update({f"{k}/{spec}": v for spec, row in summary.items() for k, v in row.items()})
    finally:
        tracking.finish(wb, announce=True)
    return paths


SUMMARY_KEYS = ("avg_bits", "kv_ratio", "rep_4", "fp16_ppl", "tokens_per_s")


def summarize_generations(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per policy: the mean over its prompts of ``SUMMARY_KEYS`` (NaN-aware)."""
    out: dict[str, dict[str, float]] = {}
    for spec in dict.fromkeys(r["policy"] for r in results):
        rows = [r for r in results if r["policy"] == spec]
        out[spec] = {k: float(np.nanmean([r[k] for r in rows])) for k in SUMMARY_KEYS}
    return out


def print_summary(summary: dict[str, dict[str, float]]) -> None:
    width = max(map(len, summary), default=6)
    print("\n" + f"{'policy':<{width}}  " + "  ".join(f"{k:>12}" for k in SUMMARY_KEYS))
    for spec, row in summary.items():
        print(f"{spec:<{width}}  " + "  ".join(f"{row[k]:>12.3f}" for k in SUMMARY_KEYS))


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    cfg, _ = parse_config(GenerateConfig, argv, description=__doc__.split("\n\n")[0])
    return run(cfg)


if __name__ == "__main__":
    main()
