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
    boundaries,
    certify_at_radii,
    check_radii,
    claim_boundary,
    decide,
    design,
    look_sizes,
    overclaim_probability,
    radius_share,
    spending,
    thresholds,
)

GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def grid_thresholds(sigma, grid=GRID):
    return tuple(float(t) for t in thresholds(grid, sigma))


def test_looks_grow_geometrically_up_to_n_and_the_early_looks_spend_in_proportion():
    assert look_sizes(10_000, 8, 2) == (79, 157, 313, 625, 1250, 2500, 5000, 10_000)
    # the default: 48 looks growing by 1.15, 10,000 / 1.15^47 = 14.07 draws at the first
    default = look_sizes(10_000)
    assert len(default) == 48 and default[:3] == (15, 17, 19)
    assert default[-3:] == (7562, 8696, 10_000)
    assert look_sizes(1, 8, 2) == (1,) and look_sizes(3, 8, 2) == (1, 2, 3)
    # three quarters of alpha over the early looks in proportion to their draws
    spent = spending(default, 0.001)
    assert spent[-1] == 0.001 and spent[-2] == pytest.approx(0.00075)
    assert spent[0] == pytest.approx(0.00075 * 15 / 8696)
    assert spending((10, 100, 200), 0.01, early_share=0.5) == pytest.approx((5e-4, 5e-3, 0.01))
    assert spending((7,), 0.01) == (0.01,)
    with pytest.raises(ValueError):
        spending((10, 20), 0.01, early_share=1.0)
    for bad in [dict(n=0), dict(looks=0), dict(growth=1.0)]:
        with pytest.raises(ValueError):
            look_sizes(**{"n": 100, "looks": 5, "growth": 2.0, **bad})


def test_claim_boundary_agrees_with_cohens_lower_bound():
    for n, level, threshold in [(100, 0.001, 0.5), (625, 7e-5, norm.cdf(0.5)), (40, 0.05, 0.9)]:
        k = claim_boundary(n, level, threshold)
        if k <= n:
            lower = stats.lower_confidence_bound(k, n, level)
            assert lower > 0.5 and lower >= threshold
        if k >= 1:
            below = stats.lower_confidence_bound(k - 1, n, level)
            assert not (below > 0.5 and below >= threshold)


@pytest.mark.parametrize("n, alpha", [(100, 0.01), (1000, 0.001), (10_000, 0.001)])
def test_a_one_look_design_is_certify(n, alpha):
    # one look spends all of alpha on one binomial tail: the count whose Clopper-Pearson
    # bound (statsmodels) first reaches p_r, CERTIFY's own test
    p_thresholds = grid_thresholds(0.5)
    plan = design(n, alpha, p_thresholds, looks=1)
    assert plan.looks == (n,)
    for index, threshold in enumerate(p_thresholds):
        k = claim_boundary(n, alpha, threshold)
        assert plan.counts[index] == (k,)
        assert overclaim_probability(plan, index) == pytest.approx(
            binom.sf(k - 1, n, threshold), rel=1e-9)


def test_dynamic_programme_equals_enumeration_of_every_sample_path():
    plan = Design((3, 6, 10), (0.6,), ((3, 5, 8),))
    total = 0.0
    for path in itertools.product((0, 1), repeat=10):
        if any(sum(path[:n]) >= b for n, b in zip(plan.looks, plan.counts[0], strict=True)):
            total += 0.55 ** sum(path) * 0.45 ** (10 - sum(path))
    assert overclaim_probability(plan, 0, 0.55) == pytest.approx(total, rel=1e-12)


def full_array_crossing(sizes, counts, p):
    """P(the count reaches counts[j] at some look j): the plain programme over all n + 1
    counts, written apart from the engine's windowed one; and the chance by each look."""
    alive, crossed, by_look, previous = np.ones(1), 0.0, [], 0
    for size, boundary in zip(sizes, counts, strict=True):
        alive = np.convolve(alive, binom.pmf(np.arange(size - previous + 1), size - previous, p))
        crossed += alive[boundary:].sum()
        alive[boundary:] = 0.0
        by_look.append(crossed)
        previous = size
    return crossed, by_look


def test_each_boundary_is_the_smallest_count_the_spent_alpha_allows():
    # against the full-array programme: with the boundaries found, the chance of a claim
    # by look j is within the alpha spent by j, and one count lower at look j exceeds it
    sizes = look_sizes(300, 12, 1.3)
    spent = spending(sizes, 0.01)
    for threshold in (0.5, 0.7, 0.9):
        found = boundaries(sizes, spent, threshold)
        _, by_look = full_array_crossing(sizes, found, threshold)
        for j, size in enumerate(sizes):
            assert by_look[j] <= spent[j]
            if found[j] <= size:  # a count claims here: one lower would spend too much
                lower = [*found[:j], found[j] - 1, *found[j + 1:]]
                assert full_array_crossing(sizes, lower, threshold)[1][j] > spent[j]


@pytest.mark.parametrize("n", [100, 1000, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01])
def test_the_implemented_boundaries_never_overclaim_beyond_alpha_and_sit_between_known_ones(
    n, alpha
):
    for sigma in (0.25, 0.5, 1.0):
        p_thresholds = grid_thresholds(sigma)
        plan = design(n, alpha, p_thresholds)
        for j, size in enumerate(plan.looks):  # claims monotone in the count at every look
            column = [row[j] for row in plan.counts]
            assert column == sorted(column) and column[-1] <= size + 1  # size + 1: none
        for index, threshold in enumerate(p_thresholds):
            assert overclaim_probability(plan, index) <= alpha
            for j, (size, spent) in enumerate(zip(plan.looks, plan.spent[index], strict=True)):
                # P(count_j >= b_j) <= spent_j: never laxer than CERTIFY at that alpha (and
                # no claim where a look spends nothing)
                assert plan.counts[index][j] >= (
                    claim_boundary(size, spent, threshold) if spent > 0 else size + 1)
            # and no stricter than a union bound would be at the last look
            previous = plan.spent[index][-2] if len(plan.looks) > 1 else 0.0
            assert plan.counts[index][-1] <= claim_boundary(
                n, (alpha - previous) * (1 - 1e-6), threshold)


def test_the_windowed_programme_equals_a_full_array_one_and_is_never_below_it():
    # the programme drops < 1e-30 per look at the low end into the crossing probability
    p_thresholds = grid_thresholds(0.5, (0.0, 1.0, 3.0))
    plan = design(10_000, 0.001, p_thresholds)
    for index, p in [(0, 0.5), (1, norm.cdf(2.0) - 0.01), (2, 0.999)]:
        crossed, _ = full_array_crossing(plan.looks, plan.counts[index], p)
        windowed = overclaim_probability(plan, index, p)
        # (up to float rounding of the sums, which the boundaries' 1e-9 margin covers)
        assert windowed >= crossed * (1 - 1e-12)
        assert windowed == pytest.approx(crossed, rel=1e-10)


def test_naive_retesting_after_every_batch_overclaims():
    # CERTIFY's test at the full alpha at each of 10 looks, as one would by re-running it
    looks, threshold = tuple(range(1000, 10_001, 1000)), norm.cdf(0.5 / 0.5)
    naive = Design(looks, (threshold,),
                   (tuple(claim_boundary(size, 0.001, threshold) for size in looks),))
    assert overclaim_probability(naive, 0) > 0.004


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
    # the design the code runs at the grid 0, 0.25, 0.5
    plan = design(n, alpha, grid_thresholds(sigma, (0.0, 0.25, radius)))
    bound = overclaim_probability(plan, 2, p)
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
    # every estimation draw, after the selection draws that settle the guess (11 to 20)
    assert n + 11 <= max(r.samples for r in borderline) <= n + 20


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
    # upper bound at 0.05 (0.851) is above p_r, but the last look's claim needs 8,536 of
    # all 10,000 draws, 0.864 of the remaining 5,000: at p_A = 0.851 that is 2.5 standard
    # deviations away (probability 0.005 < 0.05), so r = 0.5 is given up; at p-hat = 0.852
    # (upper bound 0.860, 0.855 needed) it is within reach (0.85).
    grid = grid_thresholds(0.5, (0.0, 0.25, 0.5))
    plan = design(10_000, 0.001, grid, looks=20, futility=0.05, growth=math.sqrt(2))
    assert plan.last_boundary(2) == 8536
    look = plan.looks.index(5000)
    decision = Decision(certified=1)  # r = 0 and 0.25 certified already
    n_a = round(share * 5000)
    upper = 1 - stats.lower_confidence_bound(5000 - n_a, 5000, 0.05)  # by symmetry
    assert upper > grid[2]  # the upper-bound rule alone would go on
    reach = binom.sf(plan.last_boundary(2) - n_a - 1, 5000, upper)
    assert reach == pytest.approx(0.0054 if given_up else 0.851, abs=0.001)
    done = decide(decision, n_a, 5000, plan, look)
    assert done == given_up
    assert decision.futile_from == (2 if given_up else None)


def test_futility_waits_for_futility_from_draws_but_a_claim_out_of_reach_is_given_up_at_once():
    # r = 0.25 at sigma 0.5: p_r = 0.6915. 9 of 22 draws: the upper bound at 0.07 (0.59)
    # is below p_r, yet p_A may be 0.72 (a 1-in-450 count there): before 400 draws the
    # radius stays open (it would be given up without the wait), from 400 draws on the
    # same share gives up even r = 0 (upper bound 0.43 < 1/2 at 185 of 463).
    grid = grid_thresholds(0.5, (0.0, 0.25))
    plan = design(10_000, 0.001, grid)
    assert plan.futility == 0.07 and plan.futility_from == 400
    assert 1 - stats.lower_confidence_bound(13, 22, 0.07) < 0.6
    early, without_wait = Decision(), Decision()
    assert not decide(early, 9, 22, plan, plan.looks.index(22))
    assert early.futile_from is None
    no_wait = design(10_000, 0.001, grid, futility_from=0)
    assert not decide(without_wait, 9, 22, no_wait, no_wait.looks.index(22))
    assert without_wait.futile_from == 1
    late = Decision()
    assert decide(late, 185, 463, plan, plan.looks.index(463))  # 0.40 of 463
    assert late.futile_from == 0
    # at 8,696 draws a count 1,500 short of the last look's boundary is out of reach of
    # the 1,304 draws left, whatever futility_from says
    never = design(10_000, 0.001, grid, futility_from=10**9)
    decision = Decision()
    assert decide(decision, never.last_boundary(1) - 1500, 8696, never, never.looks.index(8696))
    assert (decision.certified, decision.futile_from) == (0, 1)  # 0.64 of 8,696: r = 0


def test_a_radius_near_the_largest_n_can_certify_leaves_its_last_look_most_of_alpha():
    # p_r = Phi(3) = 0.99865 (r = 0.75 at sigma 0.25): no count of m draws claims it before
    # p_r^m <= 0.001, m = 5,113.8 of the 8,696 early draws, so its early looks get
    # 0.75 (1 - 5114 / 8696) = 0.31 of alpha; r = 0 (m = 10 draws) keeps nearly all of 0.75
    sizes = look_sizes(10_000)
    far, near = float(norm.cdf(0.0)), float(norm.cdf(3.0))
    assert radius_share(far, 0.001, sizes) == pytest.approx(0.75 * (1 - 9.97 / 8696), rel=1e-3)
    assert radius_share(near, 0.001, sizes) == pytest.approx(0.75 * (1 - 5113.8 / 8696),
                                                             rel=1e-4)
    assert radius_share(0.3, 0.001, (100,)) == 0.0
    plan = design(10_000, 0.001, (far, near))
    assert plan.spent[1][-2] == pytest.approx(0.001 * radius_share(near, 0.001, sizes))
    # the last look then claims at most one vote above CERTIFY's own boundary
    assert plan.last_boundary(1) - claim_boundary(10_000, 0.001, near) <= 1
    assert overclaim_probability(plan, 1) <= 0.001
