"""Summarise the tail probe: each records_*.jsonl set paired with the pool's recorded rot-select-b2.5 and fp16
(results/passkey_study/rotated/pool/records.jsonl, same rows). python results/passkey_study/rotated/tail_probe/summary.py"""
import json
import re
from collections import defaultdict
from pathlib import Path

from experiments.stats import paired_diff_ci

HERE = Path(__file__).parent
pool = defaultdict(dict)
for line in open(HERE.parent / "pool" / "records.jsonl"):
    r = json.loads(line)
    pool[r["policy"]][r["row"]] = r
runs = defaultdict(dict)
for f in sorted(HERE.glob("records_*.jsonl")):
    name = re.sub(r"_\d+$", "", f.stem.removeprefix("records_"))
    for line in open(f):
        r = json.loads(line)
        runs[name][r["row"]] = r


def mean(recs: dict[int, dict], key: str) -> float:
    return sum(r[key] for r in recs.values()) / len(recs)


for name, recs in runs.items():
    rows = sorted(recs)
    print(f"{name:12s} items {len(rows)} acc {mean(recs, 'correct'):.3f} exact {mean(recs, 'exact_match'):.3f} "
          f"Δ log-lik vs fp16 {mean(recs, 'loglik_delta'):+.3f} bits {mean(recs, 'avg_bits'):.3f}")
    for ref in ("rot-select-b2.5", "fp16"):
        for key in ("loglik_delta", "correct"):
            ci = paired_diff_ci([recs[r][key] for r in rows], [pool[ref][r][key] for r in rows])
            print(f"    minus {ref:16s} {key:13s} {ci.mean:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]")
