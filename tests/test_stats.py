"""Known-answer tests for smoothing/stats.py (Cohen et al., 2019; seed 004, App. A.5).

Every expected value is computed here independently of the code under test: closed forms,
exact binomial sums with `math.comb`/`fractions`, a root of the binomial tail found with
`scipy.optimize.brentq`, and normal quantiles from the standard library (`statistics`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from smoothing.stats import (
    ABSTAIN,
    binomial_p_value,
    certified_radius,
    certify_from_counts,
    lower_confidence_bound,
    predict_from_counts,
)

STD_NORMAL = NormalDist()


def reference_lower_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound from its definition: P_p[Bin(n, p) >= n_a] = alpha.

    The tail is continuous and strictly increasing in p for 1 <= n_a <= n, so the root is
    unique; n_a = 0 is consistent with every p, hence the bound 0.
    """
    if n_a == 0:
        return 0.0
    return brentq(lambda p: binom.sf(n_a - 1, n, p) - alpha, 0.0, 1.0, xtol=1e-15, rtol=1e-14)


def exact_two_sided_p_value(n_a: int, n_b: int) -> Fraction:
    """Exact two-sided binomial test of n_a ~ Bin(n_a + n_b, 1/2).

    Sum of the probabilities of all outcomes no more likely than the observed one; with
    p = 1/2 every outcome has probability comb(n, k) / 2**n, so the comparison is exact.
    """
    n = n_a + n_b
    observed = math.comb(n, n_a)
    total = sum(math.comb(n, k) for k in range(n + 1) if math.comb(n, k) <= observed)
    return min(Fraction(1), Fraction(total, 2**n))


# --- lower_confidence_bound -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 10, 100, 1000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.3])
def test_lower_bound_closed_forms(n: int, alpha: float) -> None:
    # n_a = n: P[Bin(n, p) >= n] = p**n = alpha
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-10)
    # n_a = 0: no evidence at all, the bound is 0
    assert lower_confidence_bound(0, n, alpha) == 0.0
    # n_a = 1: P[Bin(n, p) >= 1] = 1 - (1 - p)**n = alpha
    expected_one = -math.expm1(math.log1p(-alpha) / n)
    assert lower_confidence_bound(1, n, alpha) == pytest.approx(expected_one, rel=1e-8)


LOWER_BOUND_GRID = [
    (n_a, n, alpha)
    for n, n_as in [
        (2, [1, 2]),
        (10, [1, 3, 5, 9, 10]),
        (37, [2, 19, 30, 36]),
        (100, [1, 50, 51, 60, 84, 99, 100]),
        (1000, [500, 841, 999]),
        (100_000, [50_000, 93_319, 99_379, 99_999]),
    ]
    for n_a in n_as
    for alpha in [0.001, 0.01, 0.05, 0.2, 0.5, 0.7]
]


@pytest.mark.parametrize("n_a,n,alpha", LOWER_BOUND_GRID)
def test_lower_bound_defining_property(n_a: int, n: int, alpha: float) -> None:
    p_lower = lower_confidence_bound(n_a, n, alpha)
    assert 0.0 < p_lower < 1.0
    # the defining property of the one-sided Clopper-Pearson bound at level alpha
    assert binom.sf(n_a - 1, n, p_lower) == pytest.approx(alpha, rel=1e-6)
    # and the same root found directly from the definition
    assert p_lower == pytest.approx(reference_lower_bound(n_a, n, alpha), rel=1e-9, abs=1e-12)


def test_lower_bound_is_below_the_point_estimate_for_small_alpha() -> None:
    for n_a in range(1, 51):
        assert lower_confidence_bound(n_a, 50, 0.05) < n_a / 50


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_lower_bound_strictly_increasing_in_n_a(alpha: float) -> None:
    bounds = [lower_confidence_bound(n_a, 50, alpha) for n_a in range(51)]
    assert all(lo < hi for lo, hi in zip(bounds, bounds[1:], strict=False))


def test_lower_bound_increases_with_alpha() -> None:
    # a less confident statement (larger alpha) allows a higher lower bound
    bounds = [lower_confidence_bound(70, 100, alpha) for alpha in (0.001, 0.01, 0.05, 0.2)]
    assert all(lo < hi for lo, hi in zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_lower_bound_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        lower_confidence_bound(5, 10, alpha)


@pytest.mark.parametrize("n_a,n", [(11, 10), (-1, 10), (0, 0), (1, 0)])
def test_lower_bound_rejects_bad_counts(n_a: int, n: int) -> None:
    with pytest.raises(ValueError):
        lower_confidence_bound(n_a, n, 0.05)


# --- binomial_p_value -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_a,n_b",
    [
        (n_a, n_b)
        for n_a in [0, 1, 3, 8, 15, 29, 40]
        for n_b in [0, 1, 2, 7, 15, 30]
        if n_a + n_b > 0  # the no-vote edge has its own test
    ],
)
def test_binomial_p_value_matches_exact_sum(n_a: int, n_b: int) -> None:
    expected = float(exact_two_sided_p_value(n_a, n_b))
    assert binomial_p_value(n_a, n_b) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_binomial_p_value_hand_values() -> None:
    # 10 of 10: 2 * 2**-10
    assert binomial_p_value(10, 0) == pytest.approx(2 / 1024, rel=1e-12)
    # 15 of 20: 2 * (C(20,15)+...+C(20,20)) / 2**20 = 2 * 21700 / 1048576
    assert binomial_p_value(15, 5) == pytest.approx(2 * 21700 / 2**20, rel=1e-12)
    # a perfect split is no evidence at all
    assert binomial_p_value(6, 6) == pytest.approx(1.0)
    # symmetric in the two counts
    assert binomial_p_value(3, 17) == pytest.approx(binomial_p_value(17, 3), rel=1e-12)


def test_binomial_p_value_no_votes() -> None:
    assert binomial_p_value(0, 0) == 1.0


# --- certified_radius -------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_radius_at_known_quantiles(sigma: float) -> None:
    phi_of_one = 0.5 * (1.0 + math.erf(1.0 / math.sqrt(2.0)))
    assert certified_radius(phi_of_one, sigma) == pytest.approx(sigma, rel=1e-9)
    phi_of_two = 0.5 * (1.0 + math.erf(2.0 / math.sqrt(2.0)))
    assert certified_radius(phi_of_two, sigma) == pytest.approx(2.0 * sigma, rel=1e-9)
    # the familiar 97.5 % quantile of the standard normal
    assert certified_radius(0.975, sigma) == pytest.approx(1.959963984540054 * sigma, rel=1e-9)
    assert certified_radius(0.5, sigma) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("sigma", [0.0, -0.25, float("nan")])
def test_radius_rejects_non_positive_sigma(sigma: float) -> None:
    with pytest.raises(ValueError):
        certified_radius(0.9, sigma)


# --- certify_from_counts ----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_certify_abstains_iff_bound_at_most_half(alpha: float) -> None:
    sigma = 0.5
    n = 40
    for n_a in range(n + 1):
        expected_bound = reference_lower_bound(n_a, n, alpha)
        # the grid must not sit on the 1/2 threshold, or float rounding would decide
        assert abs(expected_bound - 0.5) > 1e-6
        cls, radius = certify_from_counts([0, 10, 0], [n - n_a, n_a, 0], alpha, sigma)
        if expected_bound <= 0.5:
            assert (cls, radius) == (ABSTAIN, 0.0)
        else:
            assert cls == 1
            expected = sigma * STD_NORMAL.inv_cdf(expected_bound)
            assert radius == pytest.approx(expected, rel=1e-7)
            assert radius > 0.0


@pytest.mark.parametrize("n_a,n", [(60, 100), (527, 1000), (26, 40)])
def test_certify_just_above_and_below_the_threshold(n_a: int, n: int) -> None:
    # alpha_star is the level at which the Clopper-Pearson bound is exactly 1/2
    alpha_star = float(binom.sf(n_a - 1, n, 0.5))
    counts = [n - n_a, n_a]
    # slightly larger alpha: bound slightly above 1/2, a tiny positive radius
    cls, radius = certify_from_counts([0, 5], counts, alpha_star * (1 + 1e-4), 1.0)
    assert cls == 1
    assert 0.0 < radius < 1e-3
    # slightly smaller alpha: bound slightly below 1/2, abstain
    assert certify_from_counts([0, 5], counts, alpha_star * (1 - 1e-4), 1.0) == (ABSTAIN, 0.0)


def test_certify_selects_from_selection_counts_not_estimation_counts() -> None:
    # the estimation counts favour class 0, but the guess comes from the selection counts:
    # class 1 with 5/100 votes is not certifiable, so CERTIFY must abstain (not certify class 0)
    assert certify_from_counts([2, 8], [95, 5], 0.001, 0.25) == (ABSTAIN, 0.0)
    # selection picks class 2; the bound uses its estimation count and n = sum of estimation
    cls, radius = certify_from_counts([1, 3, 6], [5, 15, 80], 0.001, 0.25)
    assert cls == 2
    expected = 0.25 * STD_NORMAL.inv_cdf(reference_lower_bound(80, 100, 0.001))
    assert radius == pytest.approx(expected, rel=1e-7)


def test_certify_ties_in_selection_go_to_lowest_index() -> None:
    cls, radius = certify_from_counts([5, 5, 0], [90, 10, 0], 0.001, 0.5)
    assert cls == 0
    expected = 0.5 * STD_NORMAL.inv_cdf(reference_lower_bound(90, 100, 0.001))
    assert radius == pytest.approx(expected, rel=1e-7)
    cls, _ = certify_from_counts([0, 4, 4], [0, 90, 10], 0.001, 0.5)
    assert cls == 1
    # tie on class 0 and 2: the guess is 0, whose estimation count cannot be certified
    assert certify_from_counts([3, 0, 3], [10, 0, 90], 0.001, 0.5) == (ABSTAIN, 0.0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5, 2.0])
def test_certify_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        certify_from_counts([0, 10], [0, 100], alpha, 0.25)


@pytest.mark.parametrize("sigma", [0.0, -0.25])
def test_certify_rejects_bad_sigma(sigma: float) -> None:
    with pytest.raises(ValueError):
        certify_from_counts([0, 10], [0, 100], 0.001, sigma)


# --- predict_from_counts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "counts,top",
    [
        ([15, 5], 0),
        ([5, 15, 0], 1),
        ([0, 2, 1, 30, 9], 3),
        ([0, 0, 10], 2),
        ([60, 40], 0),
    ],
)
def test_predict_just_above_and_below_alpha(counts: list[int], top: int) -> None:
    ordered = sorted(counts, reverse=True)
    p_value = float(exact_two_sided_p_value(ordered[0], ordered[1]))
    assert p_value < 0.5
    # alpha just above the exact p-value: the test rejects, PREDICT returns the top class
    assert predict_from_counts(counts, p_value * (1 + 1e-6)) == top
    # alpha just below: not significant, abstain
    assert predict_from_counts(counts, p_value * (1 - 1e-6)) == ABSTAIN


def test_predict_tests_top_against_runner_up_only() -> None:
    # n_A = 12 against the runner-up n_B = 3 (class 0), not against class 3 (2 votes)
    # nor against all other votes (5): p(12, 3) = 0.0352 > 0.02 > p(12, 2) = 0.0129
    assert float(exact_two_sided_p_value(12, 3)) > 0.02 > float(exact_two_sided_p_value(12, 2))
    assert predict_from_counts([3, 12, 0, 2], 0.02) == ABSTAIN
    assert predict_from_counts([3, 12, 0, 2], 0.04) == 1
    # the votes of the third class do not enter the test: p(12, 3) < 0.04 in both cases
    assert predict_from_counts([3, 12, 3], 0.04) == 1
    assert predict_from_counts([3, 12, 3, 3, 3], 0.04) == 1


def test_predict_abstains_on_a_tie_at_the_top() -> None:
    assert predict_from_counts([40, 40, 0], 0.5) == ABSTAIN
    assert predict_from_counts([0, 7, 7], 0.9) == ABSTAIN


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.1])
def test_predict_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        predict_from_counts([10, 0], alpha)
