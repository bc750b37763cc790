"""Pool probe (rows 0-47): would rotating keys before 2-bit quantization (QuaRot-style Hadamard) shrink the
haystack's damage, the gap the token selector leaves to fp16 (results README section 10)?

Simulated, not stored: every run of a block is quantized and dequantized at its bits (keys in a rotated basis,
``k H``, then rotated back with ``H^T``; values as always) and the result kept as a 16-bit segment, so scores are
what a rotated cache would give while bytes are not (average bits still count the setting). ``sim-`` rows do the
same without rotation: they must match the real cache's records (a check of the simulation).
Run from the repository root: python results/passkey_study/select/rotation_probe/run.py SHARD SHARDS [ITEMS] (ran: 48)
"""
import json
import sys

import torch
import yaml

import quant.kv_cache as kc
from agents.registry import make_policy
from agents.rollout import rollout
from envs.kv_precision import KVPrecisionEnv
from quant.uniform import QuantizedTensor, dequantize, quantize

torch.set_num_threads(1)
shard, shards = int(sys.argv[1]), int(sys.argv[2])
items = int(sys.argv[3]) if len(sys.argv) > 3 else 24


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


STATE = {"rotate": False}


def kept(x: torch.Tensor, axis: int, group_size: int, symmetric: bool) -> QuantizedTensor:
    """``x`` held as it is, in its own dtype (a 16-bit QuantizedTensor would round an fp32 model's values to fp16)."""
    return QuantizedTensor(x.clone(), None, None, 16, tuple(x.shape), axis % x.dim(), group_size, symmetric)


def simulated_block(keys, values, runs, group_size, symmetric):
    out = []
    h = hadamard(keys.shape[-1]).to(keys.dtype)
    for start, length, kb, vb in runs:
        k, v = keys.narrow(-2, start, length), values.narrow(-2, start, length)
        rotate = STATE["rotate"] and kb < 16  # fp16 runs (sinks, marks at 16) are stored as the cache stores them
        kr = k @ h if rotate else k
        kr = dequantize(quantize(kr, kb, kc.KEY_AXIS, group_size, symmetric), k.dtype)
        k = kr @ h.T if rotate else kr
        v = dequantize(quantize(v, vb, kc.VALUE_AXIS, group_size, symmetric), v.dtype)
        out.append(kc._Segment(16, 16, kept(k, kc.KEY_AXIS, group_size, symmetric), kept(v, kc.VALUE_AXIS, group_size, symmetric)))
    return out


kc._quantize_block = simulated_block
cfg = yaml.safe_load(open("results/passkey_study/select/pool.yaml"))["env"]
env = KVPrecisionEnv(cfg)
policies = {"2+s4": make_policy("fixed:2+s4", env=env),
            "select@4": make_policy("select:results/passkey_study/select/train_selector/selector.json", env=env)}
out = open(f"results/passkey_study/select/rotation_probe/records_{shard}.jsonl", "a")
for item in env.items[:items][shard::shards]:
    for rotate in (False, True):
        STATE["rotate"] = rotate
        for name, policy in policies.items():
            ep = rollout(env, policy, options={"row": item.row})
            i = ep.final_info
            out.write(json.dumps({"policy": ("rot-" if rotate else "sim-") + name, "row": item.row,
                                  "correct": int(i["correct"]), "loglik_delta": i["loglik_delta"],
                                  "avg_bits": i["avg_bits"]}) + "\n")
            out.flush()
