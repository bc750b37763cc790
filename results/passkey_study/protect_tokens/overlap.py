"""How many of the surprise-top4 tokens (per block, -log p under a full-precision prefill of the whole prompt:
an approximation of the probe run.py, whose surprise came from the quantized history) lie in the needle sentences?
Run from the repository root: ``python results/passkey_study/protect_tokens/overlap.py`` (48 pool items)."""
import torch, numpy as np
torch.set_num_threads(1)
from envs.evidence import evidence_char_spans, token_char_spans
from envs.kv_precision import KVPrecisionEnv
env = KVPrecisionEnv(model="embedded", task="passkey", split="train", eval_size=1000, interval=64,
                     bits=[2, 16], sink_tokens=4, features=["digits"], reference_store=True)
hits = []; share = []; blocks_with_needle_hit = []
for item in env.items[:48]:
    env.reset(options={"row": item.row}); ep = env._episode; ids = ep.prompt_ids
    ev = evidence_char_spans(ep.context, env.task.evidence(item)); ts = token_char_spans(env.tokenizer, ep.context, ids)
    needle = {t for t, (a, b) in enumerate(ts) if b > a and any(a < y and x < b for x, y in ev)}
    with torch.inference_mode():
        lp = torch.log_softmax(env.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    sur = torch.zeros(len(ids)); sur[1:] = -lp[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    chosen = []
    for s, e in ep.blocks:
        top = torch.topk(sur[s:e], min(4, e - s)).indices + s
        chosen += top.tolist()
    inn = [t in needle for t in chosen]
    hits.append(sum(inn)); share.append(np.mean(inn))
print("items", len(hits), "needle tokens chosen per item", np.mean(hits), "share of chosen in needles", np.mean(share), "needle share of prompt ~ 58/512 =", 58/512)
