"""Needles at fp16, the rest 2+s4, plus one extra block at fp16: which other block matters? (pool items)"""
import json, sys
import torch
torch.set_num_threads(1)
from agents.rollout import Schedule, rollout
from envs.kv_precision import KVPrecisionEnv
shard, shards = int(sys.argv[1]), int(sys.argv[2])
env = KVPrecisionEnv(model="embedded", task="passkey", split="train", eval_size=1000, interval=64,
                     bits=[2, 16], sink_tokens=4, features=["digits"], reference_store=True)
out = open("results/passkey_study/needle_extra/records.jsonl", "a")  # run from the repository root
for item in env.items[:24][shard::shards]:
    row = item.row
    env.reset(options={"row": row})
    ev = env.evidence_blocks(); n = len(env.block_spans())
    variants = {"needles": [], "needles+last": [n - 1], "needles+first": [0], "needles+2nd-last": [n - 2],
}
    for name, extra in variants.items():
        keep = set(ev) | set(extra)

        plan = [1 if b in keep else 0 for b in range(n)]
        ep = rollout(env, Schedule(plan), options={"row": row})
        info = ep.final_info
        out.write(json.dumps({"policy": name, "row": row, "blocks": n, "evidence": ev, "loglik_delta": info["loglik_delta"],
                              "avg_bits": info["avg_bits"], "correct_norm": int(info.get("correct_norm", info.get("correct", 0)))}) + "\n")
        out.flush()
