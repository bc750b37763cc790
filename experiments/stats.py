"""Confidence intervals and paired comparisons for per-item evaluation records.

HellaSwag accuracies of KV-precision policies differ by a point or two on a few hundred items,
well inside sampling noise, so every number we report carries a 95% interval, and differences
between policies are computed *per item* (paired): item difficulty is shared by both policies
and cancels, which makes the interval on the difference far narrower than the two separate ones.
No scipy dependency: the Student-t quantile comes from the regularised incomplete beta function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

DEFAULT_REFERENCES = ("fp16", "fixed-4")


@dataclass(frozen=True)
class CI:
    mean: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse Student-t CDF by bisection (monotone, so exact to float precision in ~100 steps)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(x: Iterable[float], level: float = 0.95) -> CI:
    """t-interval on the sample mean; with fewer than two values there is no spread, so lo = hi = mean."""
    xs = [float(v) for v in x]
    if not xs:
        raise ValueError("mean_ci needs at least one value, got an empty sequence")
    n, mean = len(xs), math.fsum(xs) / len(xs)
    if n < 2:
        return CI(mean, mean, mean)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return CI(mean, mean - half, mean + half)


def proportion_ci(successes: float, n: int, level: float = 0.95) -> CI:
    """Wilson score interval: stays inside [0, 1] and behaves at 0% or 100% where the t-interval collapses."""
    if n <= 0:
        raise ValueError(f"proportion_ci needs n > 0 trials, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"proportion_ci needs 0 <= successes <= n, got successes={successes}, n={n}")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no 1e-17 float dust
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return CI(p, lo, hi)


def paired_diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> CI:
    """t-interval on the per-item differences a - b; ``a[i]`` and ``b[i]`` must be the same item."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff_ci needs aligned sequences of equal length, got {len(a)} and {len(b)}")
    return mean_ci([float(x) - float(y) for x, y in zip(a, b, strict=True)], level)


def _ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on tie-averaged ranks); nan for < 3 pairs or a constant side."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


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


def summarize_policy(records: list[dict], by_policy: dict[str, list[dict]],
                     references: Sequence[str] = DEFAULT_REFERENCES, level: float = 0.95) -> dict:
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
    summary["items"] = n
    paired: dict = {}
    own = names.pop()
    for ref in references:
        if ref == own or ref not in by_policy:
            continue
        pairs = align(records, by_policy[ref])
        paired[ref] = {
            m: paired_diff_ci([a[f] for a, _ in pairs], [b[f] for _, b in pairs], level).as_dict()
            for m, f in (("acc", "correct"), ("acc_norm", "correct_norm"), ("loglik_delta", "loglik_delta"))
        }
    return {"summary": summary, "paired": paired}


def summarize_all(records: Iterable[dict], references: Sequence[str] = DEFAULT_REFERENCES,
                  level: float = 0.95) -> dict[str, dict]:
    """Group mixed records (as in records.jsonl) by ``policy`` and summarise each, in first-seen order."""
    by_policy: dict[str, list[dict]] = {}
    for r in records:
        if "policy" not in r:
            raise ValueError(f"record has no 'policy' field: {r!r}")
        by_policy.setdefault(r["policy"], []).append(r)
    if not by_policy:
        raise ValueError("summarize_all got no records")
    return {name: summarize_policy(recs, by_policy, references, level) for name, recs in by_policy.items()}
