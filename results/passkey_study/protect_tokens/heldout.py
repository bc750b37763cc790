"""The learned token selector on held-out items, paired with the study's recorded rows on the same items.

``run.py ... eval`` wrote ``records_eval_*.jsonl`` (the selector, its threshold and its bits were all chosen on
pool items; nothing here is tuned). The study's rows come from ``../evaluate/records.jsonl``: the probe's own
2-bit + sinks episodes reproduce the recorded ``fixed:2+s4`` ones to float noise, so pairing them is sound.

Run from the repository root: ``python results/passkey_study/protect_tokens/heldout.py``.
"""
import collections
import glob
import json
import sys

import numpy as np

sys.path.insert(0, "results/passkey_study/protect_tokens")
from summary import HERE, ci, column  # noqa: E402

STUDY = ["fp16", "fixed:2+s4", "fixed:k3v2", "static-fine-b2.5", "mlp-fine-b2.5", "mlp-b2.5",
         "static-fine-b2.25", "mlp-fine-b2.25"]


def main() -> None:
    probe: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for path in sorted(glob.glob(f"{HERE}/records_eval_*.jsonl")):
        for r in map(json.loads, open(path)):
            probe[r["policy"]][r["row"]] = r
    study: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for r in map(json.loads, open("results/passkey_study/evaluate/records.jsonl")):
        if r["policy"] in STUDY:
            study[r["policy"]][r["row"]] = {**r, "correct": r["correct_norm"]}
    check = sorted(set(probe["2+s4"]) & set(study["fixed:2+s4"]))
    gap = np.abs(column(probe["2+s4"], "loglik_delta", check) - column(study["fixed:2+s4"], "loglik_delta", check))
    print(f"check: the probe's 2+s4 against the recorded fixed:2+s4 on {len(check)} items: max |Δ log-lik| "
          f"{gap.max():.1e}\n")
    for name, records in probe.items():
        if name == "2+s4":
            continue
        rows = sorted(set(records).intersection(*(set(study[s]) for s in STUDY)))
        ll, acc = column(records, "loglik_delta", rows), column(records, "correct", rows)
        print(f"{name}: {len(rows)} held-out items, {column(records, 'avg_bits', rows).mean():.2f} avg bits, "
              f"acc {acc.mean():.3f}, Δ log-lik vs fp16 {ll.mean():+.2f}\n")
        print("| against | its avg bits | its acc | Δ log-lik | Δacc |")
        print("|---|---|---|---|---|")
        for other in STUDY:
            o = study[other]
            print(f"| {other} | {column(o, 'avg_bits', rows).mean():.2f} | {column(o, 'correct', rows).mean():.3f} | "
                  f"{ci(ll - column(o, 'loglik_delta', rows), '+.2f')} | {ci(acc - column(o, 'correct', rows), '+.3f')} |")
        print()


if __name__ == "__main__":
    main()
