"""Wald's lower bound that bench.sequential sets beside the measured draws."""

import math

import pytest
from scipy.stats import norm

from bench.sequential import ALPHA, N0, SIGMA, N, wald_bound


def test_a_certain_example_needs_log_one_over_alpha_over_log_one_over_p_r():
    # KL(1 || q) = log(1 / q): at p_A = 1 certifying r = 1.0 needs log(1/alpha) / log(1/Phi(2))
    expected = N0 + math.log(1 / ALPHA) / math.log(1 / norm.cdf(1.0 / SIGMA))
    assert wald_bound(1.0, 1.3) == pytest.approx(expected, rel=1e-9)
    assert 399 < expected < 402


def test_the_radius_is_rounded_down_to_the_grid_and_r0_uses_one_half():
    p = 0.8  # KL(0.8 || 0.5) = 0.8 log 1.6 + 0.2 log 0.4
    divergence = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert wald_bound(p, 0.2) == pytest.approx(N0 + math.log(1 / ALPHA) / divergence)


def test_near_a_threshold_the_bound_is_the_standard_runs_n_and_uncertified_costs_n0():
    near = norm.cdf(0.5 / SIGMA) + 1e-4
    assert wald_bound(near, 0.5) == N0 + N
    assert wald_bound(0.3, None) == N0
