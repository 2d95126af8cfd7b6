"""The statistics of PREDICT and CERTIFY (Cohen et al., 2019, Sec. 3.2; seed 004, App. A.5).

Pure functions of counts: no tensors, no randomness. Everything a certificate
rests on is here, so it can be checked against known answers in isolation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

ABSTAIN = -1


def _check_sigma(sigma: float) -> None:
    if not sigma > 0:  # also rejects NaN
        raise ValueError(f"sigma must be > 0, got {sigma}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from n_a ~ Binomial(n, p).

    The one-sided bound at level alpha is the lower end of the two-sided
    interval at level 2 * alpha.
    """
    _check_alpha(alpha)
    if n < 1 or not 0 <= n_a <= n:
        raise ValueError(f"need 0 <= n_a <= n and n >= 1, got n_a={n_a}, n={n}")
    return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def binomial_p_value(n_a: int, n_b: int) -> float:
    """Two-sided p-value of n_a ~ Binomial(n_a + n_b, 1/2): PREDICT's test."""
    if n_a + n_b == 0:
        return 1.0
    return float(binomtest(n_a, n_a + n_b, p=0.5).pvalue)


def certified_radius(p_a_lower: float, sigma: float) -> float:
    """L2 radius sigma * Phi^-1(p_A lower bound); only meaningful when p_a_lower > 1/2."""
    _check_sigma(sigma)
    return float(sigma * norm.ppf(p_a_lower))


def certify_from_counts(
    counts_selection: Sequence[int], counts_estimation: Sequence[int], alpha: float, sigma: float
) -> tuple[int, float]:
    """CERTIFY's decision: guess c_A from the selection counts, bound p_A on the others.

    Returns (class, radius), or (ABSTAIN, 0.0) when the lower bound is <= 1/2.
    Ties in the selection counts go to the lowest class index (numpy argmax).
    """
    _check_sigma(sigma)
    c_a = int(np.argmax(np.asarray(counts_selection)))
    counts_estimation = np.asarray(counts_estimation)
    p_a_lower = lower_confidence_bound(
        int(counts_estimation[c_a]), int(counts_estimation.sum()), alpha
    )
    if p_a_lower <= 0.5:
        return ABSTAIN, 0.0
    return c_a, certified_radius(p_a_lower, sigma)


def predict_from_counts(counts: Sequence[int], alpha: float) -> int:
    """PREDICT's decision: the top class if the binomial test separates it from the runner-up."""
    _check_alpha(alpha)
    counts = np.asarray(counts)
    # stable sort on the negated counts: ties keep the lower index first, as argmax does
    top_two = np.argsort(-counts, kind="stable")[:2]
    n_a = int(counts[top_two[0]])
    n_b = int(counts[top_two[1]]) if len(top_two) > 1 else 0
    if binomial_p_value(n_a, n_b) > alpha:
        return ABSTAIN
    return int(top_two[0])
