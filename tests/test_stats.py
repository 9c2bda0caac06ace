"""Intervals over items and paired tests (sstmerge.eval.stats) against closed forms and textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sstmerge.eval import stats
from sstmerge.pipeline.aggregate import add_per_seed_tests, average_seeds, compare, significant_pareto_front


def _wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(0, 10), (8, 10), (10, 10), (81, 263), (1, 24), (23, 24)])
def test_wilson_matches_the_closed_form(k, n):
    ci = stats.wilson_interval(k, n)
    lo, hi = _wilson_closed_form(k, n)
    assert ci.low == pytest.approx(lo, abs=1e-9) and ci.high == pytest.approx(hi, abs=1e-9)
    assert ci.value == k / n and ci.method == "wilson"


def test_wilson_textbook_value():
    ci = stats.wilson_interval(0, 10)  # the rule-of-three neighbourhood: [0, 0.2775]
    assert ci.low == 0.0 and ci.high == pytest.approx(0.2775, abs=1e-4)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
@settings(max_examples=60, deadline=None)
def test_wilson_contains_the_rate_and_stays_in_unit_interval(kn):
    k, n = kn
    ci = stats.wilson_interval(k, n)
    assert 0.0 <= ci.low <= k / n <= ci.high <= 1.0


def test_mcnemar_exact_textbook():
    # 1 item only A gets right, 9 only B: p = 2 * P(X <= 1 | Bin(10, 1/2)) = 2 * 11 / 1024
    a = [1] * 1 + [0] * 9 + [1] * 20 + [0] * 5
    b = [0] * 1 + [1] * 9 + [1] * 20 + [0] * 5
    t = stats.mcnemar_exact(a, b)
    assert t.discordant == (1, 9) and t.p_value == pytest.approx(22 / 1024)
    assert t.significant and t.difference == pytest.approx(-8 / 35)
    assert t.low <= t.difference <= t.high


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=80))
@settings(max_examples=60, deadline=None)
def test_mcnemar_is_symmetric_and_a_probability(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    ab, ba = stats.mcnemar_exact(a, b), stats.mcnemar_exact(b, a)
    assert ab.p_value == pytest.approx(ba.p_value) and 0.0 <= ab.p_value <= 1.0
    assert ab.difference == pytest.approx(-ba.difference)


@pytest.mark.parametrize("values", [[1, 0, 1, 1, 0], [0.2, 0.5, 1.0, 0.0, 0.75]])
def test_identical_outputs_give_p_one(values):
    assert stats.paired_test(values, values).p_value == 1.0
    assert stats.paired_bootstrap(values, values).p_value == 1.0
    assert stats.paired_mean_of_means([(values, values), (values[::-1], values[::-1])]).p_value == 1.0


def test_paired_bootstrap_finds_a_real_shift_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 150)
    shifted = np.clip(base + 0.2 + rng.normal(0, 0.05, 150), 0, 1)
    t = stats.paired_bootstrap(shifted, base)
    assert t.significant and t.low > 0 and t.method == "paired_bootstrap"
    noise = np.clip(base + rng.normal(0, 0.05, 150), 0, 1)
    assert not stats.paired_bootstrap(noise, base).significant
    # the paired test sees what an unpaired comparison of the two intervals cannot: a small consistent shift
    small = np.clip(base + 0.03, 0, 1)
    ia, ib = stats.bootstrap_interval(small), stats.bootstrap_interval(base)
    assert ia.low < ib.high and stats.paired_bootstrap(small, base).significant


def test_bootstrap_interval_is_seeded_and_contains_the_mean():
    x = [0.1, 0.9, 0.4, 0.4, 0.7, 0.0, 1.0, 0.3]
    a, b = stats.bootstrap_interval(x), stats.bootstrap_interval(x)
    assert a == b and a.low <= np.mean(x) <= a.high
    assert stats.bootstrap_interval([0.5] * 4).low == 0.5  # no spread, no width
    assert stats.item_interval([1, 0, 1]).method == "wilson" and stats.item_interval([0.5, 1]).method == "bootstrap"


def test_mean_of_means_interval_resamples_each_column():
    ci = stats.mean_of_means_interval([[1, 1, 1, 0], [0.2, 0.4, 0.6]])
    assert ci.value == pytest.approx((0.75 + 0.4) / 2) and ci.low <= ci.value <= ci.high and ci.n == 7


@pytest.mark.parametrize("bad", [[], [[1, 2]], [float("nan")]])
def test_bad_outcomes_are_errors(bad):
    with pytest.raises(ValueError):
        stats.bootstrap_interval(bad)
    with pytest.raises(ValueError, match="same items"):
        stats.paired_test([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar_exact([0.5, 1], [1, 1])


class _Col:
    def __init__(self, name, role=None):
        self.name, self.role = name, role


def test_compare_pairs_items_and_summary_scores():
    cols = [_Col("plain", "safety"), _Col("f1", "utility")]
    a = {"plain": {f"i{k}": 1.0 for k in range(30)}, "f1": {f"q{k}": 0.5 for k in range(20)}}
    b = {"plain": {f"i{k}": float(k < 10) for k in range(30)}, "f1": {f"q{k}": 0.5 for k in range(20)}}
    out = compare(a, b, cols)
    assert out["plain"]["method"] == "mcnemar_exact" and out["plain"]["significant"]
    assert out["f1"]["p_value"] == 1.0 and out["safety"]["significant"] and not out["utility"]["significant"]
    b_other = {"plain": {f"x{k}": 1.0 for k in range(30)}}  # different items: no paired test
    assert "plain" not in compare(a, b_other, cols)


def test_average_seeds_and_significant_front():
    s0 = {"c": {"a": 1.0, "b": 0.0}}
    s1 = {"c": {"a": 0.0, "b": 0.0}}
    assert average_seeds([s0, s1]) == {"c": {"a": 0.5, "b": 0.0}}
    rows = [{"safety": 0.9, "utility": 0.5}, {"safety": 0.8, "utility": 0.4}, {"safety": 0.5, "utility": 0.1}]
    sig = {"safety": {"significant": True}, "utility": {"significant": True}}
    not_sig = {"safety": {"significant": False}, "utility": {"significant": True}}
    tests = {(0, 1): not_sig, (0, 2): sig, (1, 2): sig}
    assert significant_pareto_front(rows, tests) == [1, 0]  # row 1 is dominated, but not significantly


def test_a_gap_holds_in_every_seed_only_when_each_seed_shows_it_significantly_with_its_sign():
    cols = [_Col("plain", "safety"), _Col("f1", "utility")]
    items = [f"i{k}" for k in range(40)]

    def model(refuses: int, f1: float) -> dict:
        return {"plain": {i: float(k < refuses) for k, i in enumerate(items)}, "f1": {f"q{k}": f1 for k in range(20)}}

    merge = {0: model(38, 0.5), 1: model(36, 0.5), 2: model(39, 0.5)}
    direct = {0: model(10, 0.5), 1: model(12, 0.5), 2: model(9, 0.5)}
    pooled = compare(average_seeds(list(merge.values())), average_seeds(list(direct.values())), cols)
    add_per_seed_tests(pooled, merge, direct, cols)
    assert pooled["plain"]["every_seed"] and pooled["safety"]["every_seed"]
    assert list(pooled["plain"]["per_seed"]) == ["0", "1", "2"]
    assert pooled["plain"]["per_seed"]["1"]["difference"] == pytest.approx((36 - 12) / 40)
    assert not pooled["f1"]["every_seed"]  # no difference at all is not a gap
    # one seed where the merge is no better: the seed-averaged test may still be significant, every_seed is not
    merge[1] = model(12, 0.5)
    pooled = compare(average_seeds(list(merge.values())), average_seeds(list(direct.values())), cols)
    add_per_seed_tests(pooled, merge, direct, cols)
    assert pooled["plain"]["significant"] and not pooled["plain"]["every_seed"]
    assert not pooled["plain"]["per_seed"]["1"]["significant"]
    # a seed evaluated on other items has no own test there: not every seed
    direct[2] = {"plain": {f"x{k}": 0.0 for k in range(40)}, "f1": direct[2]["f1"]}
    pooled = compare(merge[0], direct[0], cols)
    add_per_seed_tests(pooled, merge, direct, cols)
    assert "2" not in pooled["plain"]["per_seed"] and not pooled["plain"]["every_seed"]
