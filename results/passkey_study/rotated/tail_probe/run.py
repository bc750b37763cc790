"""Pool probe (rows 0-47, nothing fitted): the token selector plus the prompt's last N tokens marked
(TokenSelector.tail_tokens), rotated keys, marks at 4 bits, budget 2.5. One-off; run from the repository root:

    python results/passkey_study/rotated/tail_probe/run.py MODE N SHARD SHARDS [CONFIG]

MODE ``tail``: the fitted selector with tail_tokens=N; ``only``: the tail alone (no token scores above the
threshold). CONFIG (default results/passkey_study/rotated/pool_b2.5.yaml; pool_kv_b2.5.yaml rotates values
too) gives the env. Writes records_<MODE><N>[_kv]_<SHARD>.jsonl here; summary.py pairs them with the pool's
recorded rows (fp16, rot-select-b2.5)."""
import dataclasses
import json
import sys
from pathlib import Path

import torch
import yaml

from agents.registry import make_policy
from agents.token_select import TokenSelector
from envs.kv_precision import EnvConfig, KVPrecisionEnv
from experiments.evaluate import _run_policy

HERE = Path(__file__).parent
mode, n, shard, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = sys.argv[5] if len(sys.argv) > 5 else "results/passkey_study/rotated/pool_b2.5.yaml"
torch.set_num_threads(1)
env = KVPrecisionEnv(EnvConfig.from_dict(yaml.safe_load(open(config))["env"]))
selector = TokenSelector.load("results/passkey_study/select/train_selector/selector.json")
selector = dataclasses.replace(selector, tail_tokens=n, **({"threshold": float("inf")} if mode == "only" else {}))
path = HERE / f"selector_{mode}{n}.json"
selector.save(path)
policy = make_policy(f"select:{path}", env=env)
suffix = "_kv" if env.config.rotate_values else ""
with open(HERE / f"records_{mode}{n}{suffix}_{shard}.jsonl", "w") as out:
    for item in env.items[:48][shard::shards]:
        out.write(json.dumps({"row": item.row, **_run_policy(env, item.row, policy)}) + "\n")
        out.flush()
