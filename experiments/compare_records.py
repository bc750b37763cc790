"""Do two evaluations agree, episode by episode? Compare two ``records.jsonl`` files.

    python -m experiments.compare_records before/records.jsonl after/records.jsonl
    python -m experiments.compare_records a.jsonl b.jsonl --rename fixed-4=fixed:4 --rename quanto-4=quanto:4

Why: a refactor must leave every per-item score unchanged on the machine that computed it, and a
result from another machine differs by float noise that the low-bit quantizer amplifies; this prints,
per policy, how many shared episodes are identical and the largest gold log-likelihood difference, so
either claim is one command. Wall-clock fields (``ms``) and fingerprints are never compared. Exits 1
when some shared episode differs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

COMPARED = ("pred", "pred_norm", "gold", "correct", "correct_norm", "loglik_delta", "avg_bits", "kv_bytes",
            "fp16_kv_bytes", "tokens")


def load(path: Path, rename: dict[str, str]) -> dict[tuple[str, int], dict]:
    """Records keyed by (policy, row), policy names mapped through ``rename``."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            out[(rename.get(record["policy"], record["policy"]), int(record["row"]))] = record
    return out


def compare(a: dict, b: dict, fields: Sequence[str] = COMPARED) -> dict[str, dict]:
    """Per policy: shared episodes, identical ones, the fields that differed and the max |Δ loglik_delta|."""
    per_policy: dict[str, dict] = {}
    for key in sorted(a.keys() & b.keys()):
        entry = per_policy.setdefault(key[0], {"shared": 0, "identical": 0, "differing_fields": set(), "max_dloglik": 0.0})
        entry["shared"] += 1
        differing = {f for f in fields if a[key].get(f) != b[key].get(f)}
        entry["identical"] += not differing
        entry["differing_fields"] |= differing
        if "loglik_delta" in a[key] and "loglik_delta" in b[key]:
            entry["max_dloglik"] = max(entry["max_dloglik"], abs(a[key]["loglik_delta"] - b[key]["loglik_delta"]))
    return per_policy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="map a policy name (in either file) before pairing, e.g. fixed-4=fixed:4")
    args = parser.parse_args(argv)
    rename = {}
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            parser.error(f"--rename takes OLD=NEW, got {item!r}")
        rename[old] = new
    a, b = load(args.a, rename), load(args.b, rename)
    result = compare(a, b)
    if not result:
        parser.error(f"no (policy, row) pair is in both files ({len(a)} and {len(b)} records)")
    print(f"{'policy':<16} {'shared':>6} {'identical':>9} {'max |Δ loglik|':>15}  differing fields")
    for name, entry in result.items():
        fields = ", ".join(sorted(entry["differing_fields"])) or "-"
        print(f"{name:<16} {entry['shared']:>6} {entry['identical']:>9} {entry['max_dloglik']:>15.3g}  {fields}")
    only = len(a.keys() ^ b.keys())
    if only:
        print(f"({only} episodes are in one file only and were not compared)")
    return 0 if all(e["identical"] == e["shared"] for e in result.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
