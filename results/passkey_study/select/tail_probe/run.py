"""Pool probe (rows 0-47): the selector's marks plus the prompt's last N tokens marked (KIVI's recent window), budget 2.5,
marks at 4 bits. Run from the repository root: python results/passkey_study/select/tail_probe/run.py N SHARD SHARDS."""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from envs.kv_precision import KVPrecisionEnv, EnvConfig
from agents.registry import make_policy
from agents.rollout import rollout
import yaml
N = int(sys.argv[1]); shard, shards = int(sys.argv[2]), int(sys.argv[3])
cfg = yaml.safe_load(open("results/passkey_study/select/pool.yaml"))["env"]
env = KVPrecisionEnv(cfg)
sel = make_policy("select:results/passkey_study/select/train_selector/selector.json", env=env)
class Tail:
    def predict(self, obs, state=None, episode_start=None, deterministic=True, action_masks=None):
        a, _ = sel.predict(obs, action_masks=action_masks)
        ep = env._episode
        start, end = ep.blocks[ep.block_index]
        total = len(ep.prompt_ids)
        for t in range(max(start, total - N), end):
            a[1 + t - start] = 1
        return a, state
out = open(f"results/passkey_study/select/tail_probe/records_tail{N}_{shard}.jsonl", "w")
for item in env.items[:48][shard::shards]:
    ep = rollout(env, Tail(), options={"row": item.row})
    i = ep.final_info
    out.write(json.dumps({"row": item.row, "correct": int(i["correct"]), "loglik_delta": i["loglik_delta"], "avg_bits": i["avg_bits"],
        "enforced": sum(x["budget_enforced"] for x in ep.infos), "em": int(env.greedy_exact_match())}) + "\n"); out.flush()
