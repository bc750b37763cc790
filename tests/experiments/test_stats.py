"""experiments.stats: intervals against hand computations, pairing, and the summary.json block."""

from __future__ import annotations

import math

import pytest

from experiments.stats import (
    CI,
    align,
    fingerprint_counts,
    mean_ci,
    paired_diff_ci,
    proportion_ci,
    records_by_policy,
    rows_mean,
    rows_paired_ci,
    spearman,
    summarize_all,
    summarize_policy,
)

REFS = ("fp16", "fixed:4")
T975 = {1: 12.706205, 4: 2.776445, 10: 2.228139, 30: 2.042272, 39: 2.022691}  # Student-t tables


@pytest.mark.parametrize("df", sorted(T975))
def test_mean_ci_uses_the_tabulated_t_quantile(df):
    # values -1, +1 alternating (plus a 0 for odd n): the half-width is t * sd / sqrt(n)
    n = df + 1
    xs = [(-1) ** i for i in range(n - n % 2)] + [0] * (n % 2)
    sd = math.sqrt(sum(v * v for v in xs) / (n - 1))
    ci = mean_ci(xs)
    assert ci.hi - ci.mean == pytest.approx(T975[df] * sd / math.sqrt(n), rel=1e-6)


def test_mean_ci_hand_computation():
    # x = 1..5: mean 3, sample sd sqrt(2.5), se = sqrt(2.5/5) = sqrt(0.5), t(0.975, 4) = 2.776445
    ci = mean_ci([1, 2, 3, 4, 5])
    half = 2.776445105 * math.sqrt(0.5)
    assert ci.mean == pytest.approx(3.0)
    assert (ci.lo, ci.hi) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    assert mean_ci([1, 2, 3, 4, 5], level=0.5).hi - 3 < half  # narrower at a lower level


def test_mean_ci_degenerate():
    assert mean_ci([2.5]) == CI(2.5, 2.5, 2.5)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])


def test_wilson_hand_computation_and_bounds():
    ci = proportion_ci(3, 10)  # textbook Wilson 95% interval for 3/10
    assert ci.mean == pytest.approx(0.3)
    assert (ci.lo, ci.hi) == pytest.approx((0.1078, 0.6032), abs=1e-4)
    for k, n in [(0, 1), (1, 1), (0, 50), (50, 50), (1, 3), (499, 500)]:
        c = proportion_ci(k, n)
        assert 0.0 <= c.lo <= c.mean <= c.hi <= 1.0
    assert proportion_ci(0, 20).lo == 0.0 and proportion_ci(20, 20).hi == 1.0
    assert proportion_ci(0, 20).hi > 0.0  # unlike a t-interval, 0/20 does not claim certainty
    with pytest.raises(ValueError):
        proportion_ci(1, 0)
    with pytest.raises(ValueError):
        proportion_ci(5, 3)


def _records(policy, correct, correct_norm=None, bits=4.0, rows=None, ms=10.0, tokens=100):
    correct_norm = correct if correct_norm is None else correct_norm
    rows = range(len(correct)) if rows is None else rows
    return [
        {"policy": policy, "row": r, "correct": c, "correct_norm": cn, "pred": 0, "pred_norm": 0, "gold": 0,
         "loglik_delta": -0.1 * (16 - bits) / 16, "avg_bits": bits, "kv_bytes": bits * 10,
         "fp16_kv_bytes": 160, "ms": ms, "tokens": tokens}
        for r, c, cn in zip(rows, correct, correct_norm, strict=True)
    ]


def test_paired_difference_known_items():
    # 40 items: b is right on the first 20; a is right on those and on 10 more -> a beats b on exactly 10 items
    n = 40
    a = [1] * 30 + [0] * 10
    b = [1] * 20 + [0] * 20
    ci = paired_diff_ci(a, b)
    assert ci.mean == pytest.approx(10 / 40)
    # differences are 10 ones and 30 zeros: sd = sqrt(10*0.75^2 + 30*0.25^2) / sqrt(39)
    sd = math.sqrt((10 * 0.75**2 + 30 * 0.25**2) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    assert (ci.lo, ci.hi) == pytest.approx((0.25 - half, 0.25 + half))
    assert ci.lo > 0  # a real improvement: the interval excludes 0
    # a wins on 2 items and loses on 1: no evidence either way, the interval covers 0
    c = paired_diff_ci([1, 1, 0] + [1] * 37, [0, 0, 1] + [1] * 37)
    assert c.mean == pytest.approx(1 / 40) and c.lo < 0 < c.hi
    with pytest.raises(ValueError, match="equal length"):
        paired_diff_ci([1, 0], [1])


def test_align_pairs_by_row_and_fails_on_different_items():
    a = _records("a", [1, 0, 1], rows=[7, 3, 5])
    b = _records("b", [0, 0, 1], rows=[5, 7, 3])
    pairs = align(a, b)
    assert [(x["row"], y["row"]) for x, y in pairs] == [(3, 3), (5, 5), (7, 7)]
    with pytest.raises(ValueError, match="item sets differ"):
        align(a, _records("b", [1, 1, 1], rows=[7, 3, 9]))
    with pytest.raises(ValueError, match="duplicate row=7"):
        align(a, _records("b", [1, 1, 1], rows=[7, 7, 3]))


def test_summarize_policy_structure_and_values():
    by_policy = {
        "fp16": _records("fp16", [1] * 8 + [0] * 2, bits=16),
        "fixed:4": _records("fixed:4", [1] * 6 + [0] * 4, bits=4),
        "rule": _records("rule", [1] * 7 + [0] * 3, [1] * 8 + [0] * 2, bits=8, ms=20.0, tokens=50),
    }
    out = summarize_policy(by_policy["rule"], by_policy, REFS)
    s = out["summary"]
    assert set(s) == {"acc", "acc_norm", "loglik_delta", "avg_bits", "kv_bytes", "kv_ratio", "ms_per_item",
                      "ms_per_token", "items"}
    assert s["items"] == 10
    for key in set(s) - {"items"}:
        assert set(s[key]) == {"mean", "lo", "hi"} and s[key]["lo"] <= s[key]["mean"] <= s[key]["hi"]
    assert s["acc"] == proportion_ci(7, 10).as_dict()
    assert s["acc_norm"]["mean"] == pytest.approx(0.8)
    assert s["kv_ratio"]["mean"] == pytest.approx(0.5)
    assert s["ms_per_token"]["mean"] == pytest.approx(0.4)
    assert s["ms_per_item"]["mean"] == pytest.approx(20.0)
    assert set(out["paired"]) == {"fp16", "fixed:4"}
    assert set(out["paired"]["fp16"]) == {"acc", "acc_norm", "loglik_delta", "items"}
    assert out["paired"]["fp16"]["items"] == 10
    # gold log-likelihood change, paired: (-0.1 * 8/16) - 0 at 8 bits against fp16
    assert out["paired"]["fp16"]["loglik_delta"]["mean"] == pytest.approx(-0.05)
    assert out["paired"]["fp16"]["acc"]["mean"] == pytest.approx(-0.1)
    assert out["paired"]["fixed:4"]["acc"]["mean"] == pytest.approx(0.1)
    assert out["paired"]["fixed:4"]["acc_norm"]["mean"] == pytest.approx(0.2)
    # a reference is never paired with itself, and a missing reference is simply absent
    assert set(summarize_policy(by_policy["fp16"], by_policy, REFS)["paired"]) == {"fixed:4"}
    assert summarize_policy(by_policy["rule"], {"rule": by_policy["rule"]}, REFS)["paired"] == {}
    assert set(summarize_all([r for recs in by_policy.values() for r in recs], REFS)) == set(by_policy)
    # every configured reference is paired, not only a built-in pair of them
    assert set(summarize_policy(by_policy["fixed:4"], by_policy, ("fp16", "rule"))["paired"]) == {"fp16", "rule"}


def test_summarize_policy_errors():
    with pytest.raises(ValueError, match="no records"):
        summarize_policy([], {}, REFS)
    mixed = _records("a", [1]) + _records("b", [0])
    with pytest.raises(ValueError, match="several policies"):
        summarize_policy(mixed, {}, REFS)
    bad = _records("a", [1, 0])
    del bad[1]["kv_bytes"]
    with pytest.raises(ValueError, match="'kv_bytes'"):
        summarize_policy(bad, {}, REFS)
    misaligned = {"fp16": _records("fp16", [1, 1], rows=[0, 5])}
    with pytest.raises(ValueError, match="item sets differ"):
        summarize_policy(_records("a", [1, 0]), misaligned, REFS)


def test_spearman_hand_computation_ties_and_degenerate_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    # by hand: ranks a = (1, 2, 3, 4), b = (2, 1, 4, 3): 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6*4/60
    assert spearman([0.1, 0.2, 0.3, 0.4], [5, 1, 9, 7]) == pytest.approx(0.6)
    # ties share their mean rank: b's ranks are (1.5, 1.5, 3), Pearson with (1, 2, 3) gives sqrt(3)/2
    assert spearman([1, 2, 3], [0, 0, 1]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 2], [3, 4])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])


def test_pairs_only_records_of_the_same_fingerprint():
    a = _records("a", [1, 1, 1, 1])
    b = _records("fp16", [0, 0, 0, 1], bits=16)
    for r, fp in zip(a, ["m1", "m1", "m2", None], strict=True):
        r["fingerprint"] = fp  # None: a record from before fingerprints ("unknown")
    for r, fp in zip(b, ["m1", "m2", "m2", None], strict=True):
        r["fingerprint"] = fp
    paired = summarize_policy(a, {"fp16": b}, ("fp16",))["paired"]["fp16"]
    assert paired["items"] == 3  # rows 0 (m1), 2 (m2) and 3 (unknown); row 1 was computed on two machines
    assert paired["acc"]["mean"] == pytest.approx((1 + 1 + 0) / 3)
    assert fingerprint_counts(a) == {"m1": 2, "m2": 1, "unknown": 1}
    for r in b:
        r["fingerprint"] = "m3"
    with pytest.raises(ValueError, match="shares a fingerprint"):
        summarize_policy(a, {"fp16": b}, ("fp16",))


def test_ci_text_signs_and_scales():
    assert CI(0.0038, -0.0121, 0.0197).text(100) == "+0.38 [-1.21, +1.97]"
    assert CI(-1.5, -2.0, -1.0).text() == "-1.50 [-2.00, -1.00]"


def test_records_by_policy_keys_policy_then_row_and_a_later_file_wins(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"policy": "fp16", "row": 3, "x": 1}\n{"policy": "fixed:4", "row": 3, "x": 2}\n')
    second.write_text('{"policy": "fp16", "row": 3, "x": 5}\n{"policy": "fp16", "row": 7, "x": 6}\n')
    records = records_by_policy([first, second])
    assert {p: {r: rec["x"] for r, rec in rows.items()} for p, rows in records.items()} == {
        "fp16": {3: 5, 7: 6}, "fixed:4": {3: 2}}


def test_rows_mean_and_paired_ci_read_only_the_rows_asked_for():
    by_policy = {"a": {1: {"x": 1.0}, 2: {"x": 3.0}, 3: {"x": 100.0}}, "b": {1: {"x": 0.0}, 2: {"x": 1.0}}}
    assert rows_mean(by_policy, "a", "x", [1, 2]) == pytest.approx(2.0)
    ci = rows_paired_ci(by_policy, "a", "b", "x", [1, 2])  # differences 1 and 2
    assert ci.mean == pytest.approx(1.5)
    assert ci.hi - ci.mean == pytest.approx(T975[1] * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)
    with pytest.raises(ValueError, match="at least one row"):
        rows_mean(by_policy, "a", "x", [])
    with pytest.raises(KeyError):
        rows_paired_ci(by_policy, "a", "b", "x", [3])  # b never ran row 3
