"""A learned token selector for the protect-tokens probe: which tokens of a block to keep at higher precision.

Logistic regression on per-token features that a controller can compute when it commits a block (the block's
own tokens only, nothing from later blocks, no model pass), fitted on pool items 48..(48+N) to predict the
privileged label "this token lies in a needle sentence" (learning by cheating, as the MLP does on blocks). The
threshold is set on the same fitting items so that the selector keeps as many tokens per item as there are
needle tokens on average. The probe's own items (the first 48 pool items) are never fitted on; precision and
recall are reported on them. Writes ``selector.json``; ``run.py``'s ``learned-tokens@B`` variant reads it.

Run from the repository root: ``python results/passkey_study/protect_tokens/selector.py [N]`` (default 120).
"""
import json
import sys

import numpy as np
import torch

from envs.evidence import evidence_char_spans, token_char_spans
from envs.kv_precision import KVPrecisionEnv

FEATURES = ["digit", "digits_near", "upper", "upper_near", "word_start", "punct", "rarity", "upper_digit_near"]
WINDOW = 8  # tokens each side, inside the block


def token_features(pieces: list[str], blocks: list[tuple[int, int]], vocab_size: int, ids: list[int]) -> np.ndarray:
    """[tokens, len(FEATURES)]: per-token facts and their density in a +-WINDOW window clipped to the token's block."""
    digit = np.array([any(c.isdigit() for c in p) for p in pieces], dtype=float)
    upper = np.array([p.strip()[:1].isupper() for p in pieces], dtype=float)
    word_start = np.array([p[:1] in (" ", "\n") for p in pieces], dtype=float)
    punct = np.array([bool(p.strip()) and not any(c.isalnum() for c in p) for p in pieces], dtype=float)
    rarity = np.log1p(np.array(ids, dtype=float)) / np.log(vocab_size)  # BPE ids grow as merges get rarer
    near_d, near_u = np.zeros(len(pieces)), np.zeros(len(pieces))
    for s, e in blocks:
        for t in range(s, e):
            a, b = max(s, t - WINDOW), min(e, t + WINDOW + 1)
            near_d[t], near_u[t] = digit[a:b].mean(), upper[a:b].mean()
    return np.stack([digit, near_d, upper, near_u, word_start, punct, rarity, near_d * near_u], axis=1)


def item_data(env: KVPrecisionEnv, item) -> tuple[np.ndarray, np.ndarray]:
    """Features and needle labels of one item's prompt tokens."""
    env.reset(options={"row": item.row})
    ep = env._episode
    ids = ep.prompt_ids
    spans = evidence_char_spans(ep.context, env.task.evidence(item))
    tokens = token_char_spans(env.tokenizer, ep.context, ids)
    label = np.array([b > a and any(a < y and x < b for x, y in spans) for a, b in tokens], dtype=float)
    pieces = [env.tokenizer.decode([i]) for i in ids]
    return token_features(pieces, ep.blocks, len(env.tokenizer), ids), label


def main() -> None:
    n_fit = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    torch.set_num_threads(1)
    env = KVPrecisionEnv(model="embedded", task="passkey", split="train", eval_size=1000, interval=64,
                         bits=[2, 16], sink_tokens=4, features=["digits"], reference_store=True)
    fit = [item_data(env, it) for it in env.items[48 : 48 + n_fit]]
    probe = [item_data(env, it) for it in env.items[:48]]
    x = np.concatenate([f for f, _ in fit])
    y = np.concatenate([lab for _, lab in fit])
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.tensor((x - mean) / std, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
        loss.backward()
        return loss

    opt.step(closure)
    score = lambda f: (f - mean) / std @ w.detach().numpy() + b.item()  # noqa: E731
    fit_scores = np.concatenate([score(f) for f, _ in fit])
    per_item = len(y) and y.sum() / len(fit)  # needle tokens per item
    threshold = float(np.sort(fit_scores)[::-1][int(per_item * len(fit))])
    chosen = [score(f) > threshold for f, _ in probe]
    tp = sum(float((c * lab).sum()) for c, (_, lab) in zip(chosen, probe))
    picked = sum(float(c.sum()) for c in chosen)
    needles = sum(float(lab.sum()) for _, lab in probe)
    out = {"features": FEATURES, "window": WINDOW, "mean": mean.tolist(), "std": std.tolist(),
           "weights": w.detach().tolist(), "bias": b.item(), "threshold": threshold, "fit_items": n_fit,
           "probe_items": 48, "probe_precision": tp / max(picked, 1), "probe_recall": tp / needles,
           "probe_tokens_per_item": picked / 48, "needle_tokens_per_item": needles / 48}
    json.dump(out, open("results/passkey_study/protect_tokens/selector.json", "w"), indent=1)
    print({k: v for k, v in out.items() if k.startswith(("probe", "needle", "threshold"))})
    print(dict(zip(FEATURES, np.round(w.detach().numpy(), 2).tolist())))


if __name__ == "__main__":
    main()
