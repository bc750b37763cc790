"""Hand-made HellaSwag items and a tiny-model env factory shared by the env tests.

Short texts keep prompts to a few blocks of 16 tokens on the byte-level tiny tokenizer, so a
whole episode is a handful of millisecond forwards.
"""

from __future__ import annotations

import numpy as np

from envs.hellaswag import HellaSwagItem, build_prompt, sample_shots
from envs.kv_precision import KVPrecisionEnv
from envs.scoring import TARGET_DELIMITER, encode_pair

_SUBJECTS = ["A man", "A woman", "The dog", "A child", "The cook", "A girl", "The team", "A boy",
             "The cat", "A pilot", "The band", "A nurse"]
_VERBS = ["opens the door", "paints a wall", "jumps the fence", "reads a book", "cuts the bread",
          "rides a bike", "kicks the ball", "climbs a tree", "eats the fish", "lands a plane",
          "plays a song", "helps a man"]
_ENDINGS = ("and smiles.", "then walks away slowly.", "but falls.", "while singing loudly to the sky.")

ITEMS: tuple[HellaSwagItem, ...] = tuple(
    HellaSwagItem(
        row=100 + i,
        activity_label=f"Task {i}",
        ctx=f"{_SUBJECTS[i]} {_VERBS[i]}",
        endings=tuple(_ENDINGS[(i + k) % 4] for k in range(4)),
        label=i % 4,
    )
    for i in range(len(_SUBJECTS))
)

#: Small config: 1 shot, blocks of 16 tokens, quantization groups that fit the blocks exactly.
TINY_CONFIG = dict(model="tiny-random-llama", shots=1, interval=16, eval_size=2, group_size=16)


def make_env(tiny_model, **overrides) -> KVPrecisionEnv:
    model, tokenizer = tiny_model
    return KVPrecisionEnv(lm=model, tokenizer=tokenizer, items=ITEMS, **{**TINY_CONFIG, **overrides})


def expected_inputs(env: KVPrecisionEnv, row: int) -> tuple[list[int], list[list[int]]]:
    """Prompt and ending ids of ``reset(options={"row": row})``, rebuilt from public pieces."""
    item = next(it for it in ITEMS if it.row == row)
    rng = np.random.default_rng([env.config.split_seed, row])
    shots = sample_shots(env.pool, env.config.shots, rng, exclude_row=row)
    context = build_prompt(item, shots)
    pairs = [encode_pair(env.tokenizer, context, TARGET_DELIMITER + e) for e in item.endings]
    return pairs[0][0], [c for _, c in pairs]


def tiny_model_with_layers(num_layers: int):
    """``(model, tokenizer)``: the tiny Llama's shape and tokenizer with ``num_layers`` layers (seeded),
    for layer-group tests that need a layer count the 2-layer tiny model does not have."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    from envs.model import load_model

    base, tokenizer = load_model("tiny-random-llama")
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = num_layers
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def assert_vector_follows_single(vec, single: KVPrecisionEnv, rows: list[int], action, **tolerance) -> dict:
    """Each row's observations in the batched env ``vec`` (one fixed ``action`` every step) equal the single
    env's on the same row, step for step (``tolerance``: ``np.testing.assert_allclose``'s rtol/atol).
    Returns the batched reset's info."""
    obs, reset_info = vec.reset(options={"rows": rows})
    traces = [[o] for o in obs]
    while not vec.idle.all():
        obs, _, term, _, _ = vec.step(np.stack([action] * len(rows)))
        for i in range(len(rows)):
            if not vec.idle[i] or term[i]:
                traces[i].append(obs[i])
    for i, row in enumerate(rows):
        obs, _ = single.reset(options={"row": row})
        ref, done = [obs], False
        while not done:
            obs, _, done, _, _ = single.step(action)
            ref.append(obs)
        np.testing.assert_allclose(np.stack(traces[i]), np.stack(ref), **tolerance)
    return reset_info
