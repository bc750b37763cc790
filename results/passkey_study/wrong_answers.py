"""Which candidate each wrong answer picked: counts, per policy, the wrong answers that are the other needle's key.

    python results/passkey_study/wrong_answers.py      # from the repository root
"""
import json, collections
import torch; torch.set_num_threads(1)
from envs.kv_precision import KVPrecisionEnv
env = KVPrecisionEnv(model="embedded", task="passkey", split="eval", eval_size=1000, interval=64, features=["digits"], reference_store=True)
items = {it.row: it for it in env.items[:500]}
by = collections.defaultdict(dict)
for l in open("results/passkey_study/evaluate/records.jsonl"):
    r = json.loads(l); by[r["policy"]][r["row"]] = r
for p in ["fp16", "fixed:2+s4", "fixed:k3v2", "mlp-b2.5", "mlp-fine-b2.5", "mlp-fine-b2.25", "static-fine-b2.5", "static-fine-b2.25", "evidence-fine-b2.5"]:
    wrong = other = 0
    for row, r in by[p].items():
        if r["correct_norm"]: continue
        it = items[row]; wrong += 1
        others = {k for n, k, _ in it.needles if k != it.endings[it.label]}
        if it.endings[r["pred_norm"]] in others: other += 1
    print(p, "items", len(by[p]), "wrong", wrong, "other needle", other)
