"""Group-sequential certification at a grid of radii: validity computed exactly, then sampled."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from smoothing import stats
from smoothing.core import Smooth
from smoothing.sequential import (
    Decision,
    Design,
    certify_at_radii,
    check_radii,
    claim_boundary,
    decide,
    design,
    exact_last_look,
    grid_design,
    overclaim_probability,
    thresholds,
)


def test_design_grows_geometrically_up_to_n_and_spends_at_most_alpha():
    plan = design(10_000, 0.001, looks=8, growth=2)
    assert plan.looks == (79, 157, 313, 625, 1250, 2500, 5000, 10_000)
    # the default: 30 looks growing by 1.25, 10,000 / 1.25^29 = 15.5 draws at the first
    default = design(10_000, 0.001)
    assert len(default.looks) == 30 and default.looks[:3] == (16, 20, 25)
    assert default.looks[-3:] == (6400, 8000, 10_000)
    # half of alpha at the last look, the other half in proportion to sqrt(n_j)
    assert default.alphas[-1] == pytest.approx(0.0005) and default.alpha <= 0.001
    assert math.fsum(default.alphas[:-1]) == pytest.approx(0.0005)
    assert default.alphas[-2] / default.alphas[0] == pytest.approx(math.sqrt(8000 / 16))
    assert default.alphas[1] / default.alphas[0] == pytest.approx(math.sqrt(20 / 16))
    assert plan.alpha <= 0.001 and plan.alphas[-1] == pytest.approx(0.0005)
    assert design(1, 0.01).looks == (1,) and design(1, 0.01).alphas == (0.01,)


def test_claim_boundary_agrees_with_cohens_lower_bound():
    for n, level, threshold in [(100, 0.001, 0.5), (625, 7e-5, norm.cdf(0.5)), (40, 0.05, 0.9)]:
        k = claim_boundary(n, level, threshold)
        if k <= n:
            lower = stats.lower_confidence_bound(k, n, level)
            assert lower > 0.5 and lower >= threshold
        if k >= 1:
            below = stats.lower_confidence_bound(k - 1, n, level)
            assert not (below > 0.5 and below >= threshold)


def test_one_look_overclaim_is_the_binomial_tail():
    plan = Design((500,), (0.01,))
    threshold = norm.cdf(0.25 / 0.5)
    k = claim_boundary(500, 0.01, threshold)
    assert overclaim_probability(plan, threshold) == pytest.approx(binom.sf(k - 1, 500, threshold))


def test_dynamic_programme_equals_enumeration_of_every_sample_path():
    plan = Design((3, 6, 10), (0.05, 0.05, 0.1))
    threshold, p = 0.6, 0.55
    boundaries = [
        claim_boundary(n, a, threshold) for n, a in zip(plan.looks, plan.alphas, strict=True)
    ]
    total = 0.0
    for path in itertools.product((0, 1), repeat=10):
        if any(sum(path[:n]) >= b for n, b in zip(plan.looks, boundaries, strict=True)):
            total += p ** sum(path) * (1 - p) ** (10 - sum(path))
    assert overclaim_probability(plan, threshold, p) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("n", [100, 1000, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01])
def test_the_implemented_boundaries_never_overclaim_beyond_alpha(n, alpha):
    plan = design(n, alpha)
    for sigma in (0.25, 0.5, 1.0):
        for radius in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0):
            assert overclaim_probability(plan, norm.cdf(radius / sigma)) <= alpha


GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@pytest.mark.parametrize("n", [100, 1000, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01])
def test_the_exact_last_look_never_overclaims_beyond_alpha_and_sits_between_known_bounds(
    n, alpha
):
    union = design(n, alpha)
    for sigma in (0.25, 0.5, 1.0):
        p_thresholds = tuple(float(t) for t in thresholds(GRID, sigma))
        plan = grid_design(n, alpha, p_thresholds)
        assert plan.looks == union.looks and plan.alphas == union.alphas
        assert list(plan.last_counts) == sorted(plan.last_counts)
        for index, threshold in enumerate(p_thresholds):
            assert overclaim_probability(plan, threshold, radius_index=index) <= alpha
            # no laxer than CERTIFY's one look at alpha, no stricter than the union bound's
            assert (claim_boundary(n, alpha, threshold) <= plan.last_counts[index]
                    <= claim_boundary(n, union.alphas[-1], threshold))


def test_where_the_early_looks_cannot_claim_the_last_look_is_certify_at_alpha():
    # 10 draws at level 1e-12 can never claim p_r = 0.9 (0.063 with all 10 votes), so the
    # last look may spend all of alpha: CERTIFY's own boundary at n = 1,000
    plan = exact_last_look(Design((10, 1000), (1e-12, 0.0005)), [0.9], 0.001)
    assert plan.last_counts == (claim_boundary(1000, 0.001, 0.9),)
    assert plan.last_counts[0] < claim_boundary(1000, 0.0005, 0.9)  # the union bound's


def test_the_windowed_programme_equals_a_full_array_one_and_is_never_below_it():
    # the programme drops < 1e-30 per look at the low end into the crossing probability;
    # against the plain programme over all n + 1 counts
    plan = design(10_000, 0.001)
    for threshold, p in [(0.5, 0.5), (norm.cdf(1.0), norm.cdf(1.0) - 0.01), (0.999, 0.999)]:
        alive, crossed, previous = np.ones(1), 0.0, 0
        for look, level in zip(plan.looks, plan.alphas, strict=True):
            alive = np.convolve(alive, binom.pmf(np.arange(look - previous + 1),
                                                 look - previous, p))
            boundary = claim_boundary(look, level, threshold)
            crossed += alive[boundary:].sum()
            alive[boundary:] = 0.0
            previous = look
        windowed = overclaim_probability(plan, threshold, p)
        # (up to float rounding of the sums, which exact_last_look's 1e-9 margin covers)
        assert windowed >= crossed * (1 - 1e-12)
        assert windowed == pytest.approx(crossed, rel=1e-10)


def test_naive_retesting_after_every_batch_overclaims():
    # the full alpha at each of 10 looks, as one would by re-running CERTIFY's test
    naive = Design(tuple(range(1000, 10_001, 1000)), (0.001,) * 10)
    assert overclaim_probability(naive, norm.cdf(0.5 / 0.5)) > 0.004


class KnownProbability(nn.Module):
    """Votes class 0 iff the first pixel of its input is below t: P(class 0) = Phi(t / sigma)
    for the input 0 under N(0, sigma^2) noise."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x):
        margin = x.flatten(1)[:, :1] - self.t
        return torch.cat([-margin, margin], dim=1)


def run_trials(p, trials, sigma, radii, n, alpha, seed=0):
    smooth = Smooth(KnownProbability(sigma * norm.ppf(p)), num_classes=2, sigma=sigma)
    x = torch.zeros(1, 1, 1)
    results = []
    for trial in range(trials):
        generator = torch.Generator().manual_seed(seed * 100_000 + trial)
        results.append(certify_at_radii(smooth, x, 20, n, alpha, 1000, radii, generator))
    return results


def test_coverage_through_the_real_code_path():
    sigma, radius, alpha, n, trials = 0.5, 0.5, 0.1, 1000, 1500
    threshold = norm.cdf(radius / sigma)
    p = threshold - 0.01  # a claim at `radius` is false
    results = run_trials(p, trials, sigma, (0.25, radius), n, alpha)
    false_claims = sum(r.radius >= radius for r in results)
    # the design the code runs: grid 0, 0.25, 0.5, the last look's counts set exactly
    plan = grid_design(n, alpha, tuple(thresholds((0.0, 0.25, radius), sigma)))
    bound = overclaim_probability(plan, threshold, p, radius_index=2)
    assert bound <= alpha
    # futility and early stops only remove claims: the rate is at most the exact bound
    assert false_claims / trials <= bound + 3 * math.sqrt(bound * (1 - bound) / trials)
    assert all(r.prediction in (0, stats.ABSTAIN) for r in results)


def test_clear_examples_stop_early_and_borderline_ones_use_every_draw():
    sigma, n = 0.5, 10_000
    clear = run_trials(0.999, 20, sigma, (0.25, 0.5), n, 0.001)
    assert all(r.radius == 0.5 and r.samples < 100 + n / 10 for r in clear)
    # p_A = 0.7: r = 0 certified at once, r = 1 (p_r = 0.977) given up at once
    far_below = run_trials(0.7, 20, sigma, (1.0, 1.5), n, 0.001)
    # (a wrong guess from the 20 selection draws abstains, as fast)
    assert all(r.prediction in (0, stats.ABSTAIN) and r.radius == 0.0 for r in far_below)
    assert all(r.samples < 100 + n / 10 for r in far_below)
    borderline = run_trials(norm.cdf(0.5 / sigma) + 0.005, 5, sigma, (0.25, 0.5), n, 0.001)
    assert max(r.samples for r in borderline) == 20 + n


def test_radii_are_checked_and_zero_is_always_in_the_grid():
    assert check_radii([0.25, 0.5]) == (0.0, 0.25, 0.5)
    assert check_radii([0, 1]) == (0.0, 1.0)
    for bad in ([], [0.5, 0.25], [-0.1, 0.2], [0.5, 0.5], [float("nan")]):
        with pytest.raises(ValueError):
            check_radii(bad)


def test_fewer_samples_when_p_a_is_far_from_every_threshold():
    # p_A between the thresholds of r = 0.25 (0.69) and r = 0.5 (0.84), or near 1
    sigma, n = 0.5, 10_000
    for p in (0.76, 0.9999):
        samples = [r.samples for r in run_trials(p, 5, sigma, (0.25, 0.5), n, 0.001)]
        assert max(samples) < 0.2 * (20 + n)


@pytest.mark.parametrize("share, given_up", [(0.843, True), (0.852, False)])
def test_a_radius_out_of_reach_of_the_last_look_is_given_up_above_its_threshold(
    share, given_up
):
    # r = 0.5 at sigma 0.5: p_r = 0.8413. After 5,000 of 10,000 draws at p-hat = 0.843 the
    # upper bound at 0.05 (0.851) is above p_r, but the last look's claim needs about
    # 0.8533 of all 10,000 draws, 0.864 of the remaining 5,000: at p_A = 0.851 that is
    # 2.4 standard deviations away (probability 0.007 < 0.05), so r = 0.5 is given up;
    # at p-hat = 0.852 (upper bound 0.860, 0.855 needed) it is within reach (0.87).
    plan = design(10_000, 0.001, looks=20, futility=0.05, growth=math.sqrt(2))
    look = plan.looks.index(5000)
    grid = thresholds((0.0, 0.25, 0.5), 0.5)
    decision = Decision(certified=1)  # r = 0 and 0.25 certified already
    n_a = round(share * 5000)
    upper = 1 - stats.lower_confidence_bound(5000 - n_a, 5000, 0.05)  # by symmetry
    assert upper > grid[2]  # the upper-bound rule alone would go on
    needed = claim_boundary(10_000, plan.alphas[-1], float(grid[2])) - n_a
    reach = binom.sf(needed - 1, 5000, upper)
    assert reach == pytest.approx(0.0068 if given_up else 0.869, abs=0.001)
    done = decide(decision, n_a, 5000, plan, look, grid)
    assert done == given_up
    assert decision.futile_from == (2 if given_up else None)


def test_futility_waits_for_futility_from_draws_but_a_claim_out_of_reach_is_given_up_at_once():
    # r = 0.25 at sigma 0.5: p_r = 0.6915. 8 of 20 draws: the upper bound at 0.1 (0.55) is
    # far below p_r, yet p_A may be 0.72 (a 1-in-60 count there): before 400 draws the
    # radius stays open (it would be given up without the wait), from 400 draws on the
    # same share gives up even r = 0 (upper bound 0.43 < 1/2).
    plan = design(10_000, 0.001)
    grid = thresholds((0.0, 0.25), 0.5)
    assert plan.futility_from == 400 and 1 - stats.lower_confidence_bound(12, 20, 0.1) < 0.6
    early, without_wait = Decision(), Decision()
    assert not decide(early, 8, 20, plan, plan.looks.index(20), grid)
    assert early.futile_from is None
    no_wait = design(10_000, 0.001, futility_from=0)
    assert not decide(without_wait, 8, 20, no_wait, no_wait.looks.index(20), grid)
    assert without_wait.futile_from == 1
    late = Decision()
    assert decide(late, 177, 440, plan, plan.looks.index(440), grid)  # 0.40 of 440
    assert late.futile_from == 0
    # at 8,000 draws a count 2,500 short of the last look's boundary is out of reach of the
    # 2,000 draws left, whatever futility_from says
    never = design(10_000, 0.001, futility_from=10**9)
    needed = claim_boundary(10_000, never.alphas[-1], float(grid[1]))
    decision = Decision()
    assert decide(decision, needed - 2500, 8000, never, never.looks.index(8000), grid)
    assert (decision.certified, decision.futile_from) == (0, 1)  # 0.57 of 8,000: r = 0
