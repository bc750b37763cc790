"""Probe (pool items): does keeping a few *tokens* of a block in fp16 do what keeping whole needle blocks does?

Every block is forwarded whole (its tokens see each other at full precision, as in the env), then
committed as runs: the protected tokens of the block in fp16, the others at the block's bits (each run
its own quantization groups; the first 4 tokens of the prompt are fp16 sinks as in the env's 2+s4).
Average bits count 16 for a protected token. Variants:

- ``2+s4``: nothing protected (must equal the env's fixed:2+s4: a check of this script)
- ``needle-tokens@B``: only the needle sentences' tokens at B bits (privileged: the generator's evidence)
- ``needle-blocks@B``: the needle blocks whole at B bits
- ``learned-tokens@B``: the tokens the learned selector picks (selector.py, fitted on other pool items) at B bits
- ``digits@B``: every token that holds a digit at B bits (a content rule, but one written for this task)
- ``surprise-top{k}@B``: per block, the k tokens the model found least likely (-log p of the token given
  the prefix, from the block's own logits) at B bits: a content signal any policy can compute as it streams

Run from the repository root: ``python results/passkey_study/protect_tokens/run.py SHARD SHARDS [ITEMS [VARIANT,...|all [SPLIT]]]``.
"""
import json
import sys

import numpy as np
import torch

from envs.cache_kwarg import with_cache
from envs.evidence import evidence_char_spans, token_char_spans
from envs.kv_precision import KVPrecisionEnv
from envs.scoring import continuation_logprobs
from quant.kv_cache import KEY_AXIS, VALUE_AXIS, MixedPrecisionKVCache, _Segment
from quant.uniform import quantize

sys.path.insert(0, "results/passkey_study/protect_tokens")
from selector import token_features  # noqa: E402

torch.set_num_threads(1)
shard, shards = int(sys.argv[1]), int(sys.argv[2])
items = int(sys.argv[3]) if len(sys.argv) > 3 else 24
only = sys.argv[4].split(",") if len(sys.argv) > 4 and sys.argv[4] != "all" else None  # comma list; default all
split = sys.argv[5] if len(sys.argv) > 5 else "train"  # "eval": held-out items (only to evaluate, never to choose)
SINKS, LOW = 4, 2
env = KVPrecisionEnv(model="embedded", task="passkey", split=split, eval_size=1000, interval=64,
                     bits=[2, 16], sink_tokens=SINKS, features=["digits"], reference_store=True)
model = env.model
path = f"results/passkey_study/protect_tokens/records_{'' if split == 'train' else split + '_'}{shard}.jsonl"
try:  # resume: (variant, row) pairs already recorded are not run again
    done = {(r["policy"], r["row"]) for r in map(json.loads, open(path))}
except FileNotFoundError:
    done = set()
out = open(path, "a")


def commit_runs(cache: MixedPrecisionKVCache, start: int, bits: list[int]) -> None:
    """Commit the pending block as runs of equal bits (``bits[i]``: token ``start + i``)."""
    runs, i = [], 0
    while i < len(bits):
        j = i
        while j < len(bits) and bits[j] == bits[i]:
            j += 1
        runs.append((i, j - i, bits[i]))
        i = j
    for layer in cache.layers:
        segs = []
        for s, n, b in runs:
            k = layer.keys.narrow(-2, s, n).clone()
            v = layer.values.narrow(-2, s, n).clone()
            segs.append(_Segment(b, b, quantize(k, b, KEY_AXIS, cache.group_size, cache.symmetric),
                                 quantize(v, b, VALUE_AXIS, cache.group_size, cache.symmetric)))
        layer._store(segs)


def episode(ids, blocks, endings, choose_bits) -> tuple[list[float], float]:
    """Gold-free: the endings' scores and the average bits under ``choose_bits(block, start, end, logits)``."""
    cache = MixedPrecisionKVCache(config=model.config, group_size=64)
    total_bits = 0.0
    last = None
    for b, (s, e) in enumerate(blocks):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids[s:e]]), **with_cache(model, cache), use_cache=True).logits[0]
        bits = choose_bits(b, s, e, logits)
        bits = [16 if s + i < SINKS else x for i, x in enumerate(bits)]
        commit_runs(cache, 0, bits)
        total_bits += sum(bits)
        last = logits[-1]
    with torch.inference_mode(), cache.branch(1):
        scores = continuation_logprobs(model, ids, endings, cache=cache, prefix_last_logits=last)
    return scores, total_bits / len(ids)


def surprise(ids, s, e, logits, prev_last):
    """-log p of each token of the block given its prefix (the first from the previous block's last logits)."""
    lp = torch.log_softmax(logits.float(), -1)
    out = torch.zeros(e - s)
    if prev_last is not None:
        out[0] = -torch.log_softmax(prev_last.float(), -1)[ids[s]]
    tgt = torch.tensor(ids[s + 1:e])
    out[1:] = -lp[:-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return out


def selected_tokens(ids, blocks) -> np.ndarray:
    """The learned selector's picks (selector.py: fitted on other pool items), for every prompt token."""
    sel = json.load(open("results/passkey_study/protect_tokens/selector.json"))
    f = token_features([env.tokenizer.decode([i]) for i in ids], blocks, len(env.tokenizer), ids)
    return (f - np.array(sel["mean"])) / np.array(sel["std"]) @ np.array(sel["weights"]) + sel["bias"] > sel["threshold"]


for item in env.items[:items][shard::shards]:
    env.reset(options={"row": item.row})
    ep = env._episode
    ids, blocks, endings, gold = ep.prompt_ids, ep.blocks, ep.endings, item.label
    ref_gold = float(ep.reference.ending_scores[gold])
    ev_spans = evidence_char_spans(ep.context, env.task.evidence(item))
    tok_spans = token_char_spans(env.tokenizer, ep.context, ids)
    needle_tok = {t for t, (a, b) in enumerate(tok_spans) if b > a and any(a < y and x < b for x, y in ev_spans)}
    needle_blk = {i for i, (s, e) in enumerate(blocks) if any(s <= t < e for t in needle_tok)}

    state = {"prev": None}
    learned = selected_tokens(ids, blocks)

    def surprise_top(k, high):
        def choose(b, s, e, logits):
            sur = surprise(ids, s, e, logits, state["prev"])
            state["prev"] = logits[-1]
            top = set(torch.topk(sur, min(k, e - s)).indices.tolist())
            return [high if i in top else LOW for i in range(e - s)]
        return choose

    variants = {
        "2+s4": lambda b, s, e, lg: [LOW] * (e - s),
        "needle-blocks@4": lambda b, s, e, lg: [4 if b in needle_blk else LOW] * (e - s),
        "needle-blocks@16": lambda b, s, e, lg: [16 if b in needle_blk else LOW] * (e - s),
        "needle-tokens@4": lambda b, s, e, lg: [4 if t in needle_tok else LOW for t in range(s, e)],
        "needle-tokens@8": lambda b, s, e, lg: [8 if t in needle_tok else LOW for t in range(s, e)],
        "needle-tokens@16": lambda b, s, e, lg: [16 if t in needle_tok else LOW for t in range(s, e)],
        "surprise-top4@8": surprise_top(4, 8),
        "surprise-top4@16": surprise_top(4, 16),
        "surprise-top8@4": surprise_top(8, 4),
        "digits@8": lambda b, s, e, lg: [8 if any(c.isdigit() for c in env.tokenizer.decode([ids[t]])) else LOW
                                         for t in range(s, e)],
        "learned-tokens@3": lambda b, s, e, lg: [3 if learned[t] else LOW for t in range(s, e)],
        "learned-tokens@4": lambda b, s, e, lg: [4 if learned[t] else LOW for t in range(s, e)],
    }
    if only:
        variants = {k: variants[k] for k in only}
    for name, fn in variants.items():
        if (name, item.row) in done:
            continue
        state["prev"] = None
        scores, avg_bits = episode(ids, blocks, endings, fn)
        rec = {"policy": name, "row": item.row, "tokens": len(ids), "needle_tokens": len(needle_tok),
               "avg_bits": avg_bits, "loglik_delta": scores[gold] - ref_gold,
               "correct": int(max(range(len(scores)), key=scores.__getitem__) == gold)}
        out.write(json.dumps(rec) + "\n")
        out.flush()
