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


def test_the_two_runs_are_paired_certify_draws_begin_with_the_sequential_ones():
    import torch

    from bench.sequential import KnownProbability, _both_ways
    from smoothing.core import Smooth

    inputs = []

    class Spy(KnownProbability):
        def forward(self, x):
            inputs.append(x.clone())
            return super().forward(x)

    smooth = Smooth(Spy(0.8), 3, SIGMA)
    result = _both_ways(smooth, torch.zeros(1, 1, 16), seed=7)
    seen = torch.cat(inputs)
    sequential_draws = result[4]  # the selection draws that settled the guess included
    selection = Smooth(KnownProbability(0.8), 3, SIGMA).guess(
        torch.zeros(1, 1, 16), N0, N, torch.Generator().manual_seed(7))[1]
    assert N0 // 2 < selection < N0
    assert N0 < sequential_draws < N0 + N and len(seen) == sequential_draws + N0 + N
    sequential, standard = seen[:sequential_draws], seen[sequential_draws:]
    # the selection's first draws, then CERTIFY's estimation draws begin with the looks'
    assert torch.equal(standard[:selection], sequential[:selection])
    estimation = sequential_draws - selection
    assert torch.equal(standard[N0:N0 + estimation], sequential[selection:])
    # an input whose noise the looks would split differently is refused
    with pytest.raises(ValueError, match="runs of 16"):
        _both_ways(smooth, torch.zeros(1, 1, 2), seed=7)


def test_the_design_simulation_counts_draws_against_the_plans_own_n():
    import numpy as np

    from bench.sequential_designs import THRESHOLDS, simulate
    from smoothing.sequential import design

    # p_A = 1: every draw votes for the guess, so the count at look j is n_j and the
    # largest grid radius (1.0, p_r = Phi(2)) is claimed at the first look whose boundary
    # is within its draws; CERTIFY at n certifies every radius
    for n in (1000, 100_000):
        plan = design(n, ALPHA, THRESHOLDS)
        first = next(size for size, boundary in zip(plan.looks, plan.counts[-1], strict=True)
                     if boundary <= size)
        # known answer: all of n_j votes cross at p_r = Phi(2) once Phi(2)^n_j, the chance
        # of that path, is within the alpha spent by then
        assert norm.cdf(2.0) ** first <= plan.spent[-1][plan.looks.index(first)]
        result = simulate(np.array([1.0, 1.0]), plan, 2, np.random.default_rng(0))
        assert result["draws"] == pytest.approx((N0 + first) / (N0 + n))
        assert result["sequential"] == result["standard"] == [100.0] * 5
        assert result["full_n_examples"] == 0


@pytest.mark.parametrize("sigma, radius", [(0.25, 0.5), (1.0, 2.0)])
def test_a_fitted_p_a_gives_back_its_radius_at_its_sigma(sigma, radius):
    from bench.sequential import p_a_from_radius
    from smoothing.stats import lower_confidence_bound

    p = p_a_from_radius(radius, sigma=sigma)
    # the count p * n of Cohen et al.'s n = 100,000 draws: its bound is Phi(r / sigma)
    count = round(p * 100_000)
    assert abs(lower_confidence_bound(count, 100_000, 0.001) - norm.cdf(radius / sigma)) < 2e-5
