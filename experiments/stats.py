"""Confidence intervals and paired comparisons for per-item evaluation records.

HellaSwag accuracies of KV-precision policies differ by a point or two on a few hundred items,
well inside sampling noise, so every number we report carries a 95% interval, and differences
between policies are computed *per item* (paired): item difficulty is shared by both policies
and cancels, which makes the interval on the difference far narrower than the two separate ones.
Quantiles, Wilson intervals and rank correlations come from scipy.stats.

A pair is two records of the same item computed under the same fingerprint (see
envs/fingerprint.py): per-item quantized scores differ across machines, so a difference between
records of two machines would measure the machines, not the policies. Pairs whose fingerprints
differ are left out, and each paired entry says how many ``items`` it rests on.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from scipy import stats

from envs.fingerprint import UNKNOWN
from experiments.io import read_jsonl


@dataclass(frozen=True)
class CI:
    mean: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def text(self, scale: float = 1.0) -> str:
        """``+0.38 [+0.19, +0.57]``: signed, two decimals, times ``scale`` (100 for points of accuracy)."""
        return f"{scale * self.mean:+.2f} [{scale * self.lo:+.2f}, {scale * self.hi:+.2f}]"


def mean_ci(x: Iterable[float], level: float = 0.95) -> CI:
    """Student-t interval on the sample mean; with fewer than two values there is no spread, so lo = hi = mean."""
    xs = [float(v) for v in x]
    if not xs:
        raise ValueError("mean_ci needs at least one value, got an empty sequence")
    n, mean = len(xs), math.fsum(xs) / len(xs)
    if n < 2:
        return CI(mean, mean, mean)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    return CI(mean, mean - half, mean + half)


def proportion_ci(successes: float, n: int, level: float = 0.95) -> CI:
    """Wilson score interval: stays inside [0, 1] and behaves at 0% or 100% where the t-interval collapses."""
    if n <= 0:
        raise ValueError(f"proportion_ci needs n > 0 trials, got n={n}")
    if not 0 <= successes <= n or successes != int(successes):
        raise ValueError(f"proportion_ci needs a whole number 0 <= successes <= n, got successes={successes}, n={n}")
    ci = stats.binomtest(int(successes), n).proportion_ci(confidence_level=level, method="wilson")
    return CI(successes / n, float(ci.low), float(ci.high))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> CI:
    """t-interval on the per-item differences a - b; ``a[i]`` and ``b[i]`` must be the same item."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff_ci needs aligned sequences of equal length, got {len(a)} and {len(b)}")
    return mean_ci([float(x) - float(y) for x, y in zip(a, b, strict=True)], level)


def records_by_policy(paths: Iterable[str | os.PathLike]) -> dict[str, dict[int, dict]]:
    """Evaluation records of several ``records.jsonl`` files as ``{policy: {row: record}}``, the form the
    results folders' paired tables read (a later file's record of the same policy and row wins)."""
    by_policy: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in paths:
        for record in read_jsonl(path):
            by_policy[record["policy"]][record["row"]] = record
    return by_policy


def rows_mean(by_policy: Mapping[str, Mapping[int, dict]], policy: str, key: str, rows: Sequence[int]) -> float:
    """Mean of ``key`` over ``rows`` of one policy in :func:`records_by_policy`'s form."""
    if not rows:
        raise ValueError(f"rows_mean of {policy!r} needs at least one row")
    return math.fsum(float(by_policy[policy][r][key]) for r in rows) / len(rows)


def rows_paired_ci(by_policy: Mapping[str, Mapping[int, dict]], a: str, b: str, key: str, rows: Sequence[int],
                   level: float = 0.95) -> CI:
    """``a`` minus ``b`` on ``key``, paired by row over ``rows`` (:func:`records_by_policy`'s form); the
    caller chooses rows both policies ran under one fingerprint."""
    return paired_diff_ci([by_policy[a][r][key] for r in rows], [by_policy[b][r][key] for r in rows], level)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties share their mean rank); nan for < 3 pairs or a constant side."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return float("nan")
    with warnings.catch_warnings():  # a constant side is an expected nan here, not a surprise
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(a, b).statistic)


def _index(records: Sequence[dict], key: str, which: str) -> dict:
    out: dict = {}
    for r in records:
        if key not in r:
            raise ValueError(f"record in {which} has no '{key}' field: {r!r}")
        if r[key] in out:
            raise ValueError(f"duplicate {key}={r[key]!r} in {which}; each item must appear once per policy")
        out[r[key]] = r
    return out


def align(records_a: Sequence[dict], records_b: Sequence[dict], key: str = "row") -> list[tuple[dict, dict]]:
    """Pair records of two policies item by item; different item sets make a paired test meaningless."""
    ia, ib = _index(records_a, key, "a"), _index(records_b, key, "b")
    if ia.keys() != ib.keys():
        only_a, only_b = sorted(ia.keys() - ib.keys(), key=str), sorted(ib.keys() - ia.keys(), key=str)
        raise ValueError(f"cannot pair records: item sets differ ({len(only_a)} {key}s only in a, e.g. "
                         f"{only_a[:5]}; {len(only_b)} only in b, e.g. {only_b[:5]}); evaluate both "
                         "policies on the same items")
    return [(ia[k], ib[k]) for k in sorted(ia, key=lambda k: (str(type(k)), k))]


def _column(records: Sequence[dict], field: str) -> list[float]:
    try:
        return [float(r[field]) for r in records]
    except KeyError:
        raise ValueError(f"a record lacks the '{field}' field; records need the fields written by "
                         "experiments.evaluate (see records.jsonl)") from None


def _ratio(records: Sequence[dict], num: str, den: str) -> list[float]:
    out = []
    for n, d in zip(_column(records, num), _column(records, den), strict=True):
        if d <= 0:
            raise ValueError(f"cannot compute {num}/{den}: {den} is {d} (must be > 0)")
        out.append(n / d)
    return out


def record_fingerprint(record: dict) -> str:
    """The fingerprint id a record was computed under; records from before fingerprints are ``unknown``."""
    return record.get("fingerprint") or UNKNOWN


def fingerprint_counts(records: Iterable[dict]) -> dict[str, int]:
    """How many records each fingerprint computed, in first-seen order."""
    counts: dict[str, int] = {}
    for r in records:
        fp = record_fingerprint(r)
        counts[fp] = counts.get(fp, 0) + 1
    return counts


def _paired(records: Sequence[dict], ref_records: Sequence[dict], own: str, ref: str, level: float) -> dict:
    """This policy minus ``ref`` on the items both computed under one fingerprint (see the module doc).

    A policy evaluated on a subset of the other's items (``experiments.evaluate``'s ``policy_items``:
    the costly oracle on the first few) is paired on that subset; item sets that are not nested are
    an error (:func:`align`)."""
    rows_a, rows_b = {r.get("row") for r in records}, {r.get("row") for r in ref_records}
    if rows_a < rows_b or rows_b < rows_a:
        common = rows_a & rows_b
        records = [r for r in records if r.get("row") in common]
        ref_records = [r for r in ref_records if r.get("row") in common]
    pairs = [(a, b) for a, b in align(records, ref_records) if record_fingerprint(a) == record_fingerprint(b)]
    if not pairs:
        raise ValueError(f"no item of {own!r} shares a fingerprint with {ref!r} ({own}: "
                         f"{sorted(fingerprint_counts(records))}, {ref}: {sorted(fingerprint_counts(ref_records))}); "
                         "evaluate both on the same machine to compare them")
    out = {
        m: paired_diff_ci([a[f] for a, _ in pairs], [b[f] for _, b in pairs], level).as_dict()
        for m, f in (("acc", "correct"), ("acc_norm", "correct_norm"), ("loglik_delta", "loglik_delta"))
    }
    out["items"] = len(pairs)
    return out


def summarize_policy(records: list[dict], by_policy: dict[str, list[dict]], references: Sequence[str],
                     level: float = 0.95) -> dict:
    """The ``summary`` + ``paired`` block of summary.json for one policy's per-item records.

    ``paired[ref]`` is this policy minus ``ref`` on the same items, for every reference present in
    ``by_policy`` other than the policy itself.
    """
    if not records:
        raise ValueError("summarize_policy got no records; the policy must be evaluated on at least one item")
    names = {r.get("policy") for r in records}
    if len(names) > 1:
        raise ValueError(f"summarize_policy got records of several policies {sorted(map(str, names))}; "
                         "group them by policy first (see summarize_all)")
    n = len(records)
    summary: dict = {
        "acc": proportion_ci(sum(_column(records, "correct")), n, level).as_dict(),
        "acc_norm": proportion_ci(sum(_column(records, "correct_norm")), n, level).as_dict(),
    }
    for field in ("loglik_delta", "avg_bits", "kv_bytes"):
        summary[field] = mean_ci(_column(records, field), level).as_dict()
    summary["kv_ratio"] = mean_ci(_ratio(records, "kv_bytes", "fp16_kv_bytes"), level).as_dict()
    summary["ms_per_item"] = mean_ci(_column(records, "ms"), level).as_dict()
    summary["ms_per_token"] = mean_ci(_ratio(records, "ms", "tokens"), level).as_dict()
    if all("budget_enforced" in r for r in records):  # records from before budgets lack it
        summary["budget_enforced"] = mean_ci(_column(records, "budget_enforced"), level).as_dict()
    if all("exact_match" in r for r in records):  # tasks with an exact match (passkey) record it
        summary["exact_match"] = proportion_ci(sum(_column(records, "exact_match")), n, level).as_dict()
    summary["items"] = n
    own = names.pop()
    paired = {ref: _paired(records, by_policy[ref], own, ref, level)
              for ref in references if ref != own and ref in by_policy}
    return {"summary": summary, "paired": paired}


def summarize_all(records: Iterable[dict], references: Sequence[str], level: float = 0.95) -> dict[str, dict]:
    """Group mixed records (as in records.jsonl) by ``policy`` and summarise each, in first-seen order."""
    by_policy: dict[str, list[dict]] = {}
    for r in records:
        if "policy" not in r:
            raise ValueError(f"record has no 'policy' field: {r!r}")
        by_policy.setdefault(r["policy"], []).append(r)
    if not by_policy:
        raise ValueError("summarize_all got no records")
    return {name: summarize_policy(recs, by_policy, references, level) for name, recs in by_policy.items()}
