"""Which 64-token block holds each passkey needle of the sensitivity run's pool items; the damage there vs elsewhere.

    PYTHONPATH=. python results/sensitivity_passkey/needle_blocks.py results/sensitivity_passkey/sensitivity.json
(run from the repository root; tokenizer and task only, no model forward)
"""
import json
import sys

import numpy as np
from transformers import AutoTokenizer

from envs.hellaswag import load_hellaswag
from envs.model import embedded_model_dir
from envs.tasks import make_task

res = json.load(open(sys.argv[1]))
opts = {"length": 512, "keys": 2}
tok = AutoTokenizer.from_pretrained(embedded_model_dir())
task = make_task("passkey", opts)
items = {it.row: it for it in task.load(load_hellaswag(), tok, 8192)}
by_row = {}
for m in res["measurements"]:
    by_row.setdefault(m["row"], []).append(m)
asked_d, other_d, rest_d, ranks = [], [], [], []
for row, blocks in by_row.items():
    item = items[row]
    p = task.prompt(item)
    enc = tok(p.text, return_offsets_mapping=True, add_special_tokens=False)
    def block_of(sentence, p=p, enc=enc):
        c = p.text.index(sentence)
        t = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > c + sentence.index(" is ") + 4)
        return t // 64
    asked = block_of(p.sentences[p.needle_index])
    other_keys = [k for n, k, _ in item.needles if n != item.name]
    others = {block_of(s) for s in p.sentences if any(f"is {k}." in s for k in other_keys)} - {asked}
    dmg = {b["block"]: b["damage"] for b in blocks}
    order = sorted(dmg, key=lambda j: dmg[j])  # most damaging first
    asked_d.append(dmg[asked])
    other_d += [dmg[o] for o in others]
    rest_d += [d for j, d in dmg.items() if j != asked and j not in others and j != 0 and j != len(dmg) - 1]
    ranks.append(order.index(asked) + 1)
    print(row, "blocks", len(dmg), "asked", asked, f"{dmg[asked]:+.2f}", "other", sorted(others),
          [f"{dmg[o]:+.2f}" for o in others], "first", f"{dmg[0]:+.2f}", "last", f"{dmg[len(dmg)-1]:+.2f}",
          "rank of asked", order.index(asked) + 1)
print(f"mean damage: asked-needle block {np.mean(asked_d):+.2f}, other-needle block {np.mean(other_d):+.2f}, "
      f"other middle blocks {np.mean(rest_d):+.2f}; asked block is the most damaging in {sum(r == 1 for r in ranks)}/{len(ranks)} items")
