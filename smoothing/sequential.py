"""Certified accuracy at a set of radii with as few samples as the statistics allow.

What papers report is "is x certified at radius r?" for a few r. Cohen et al.'s CERTIFY
answers it with n estimation draws whatever p_A is; most examples are decided long
before: p_A far above or far below the threshold p_r = Phi(r / sigma). Here the
estimation draws come in stages (looks at n_1 < ... < n_L = n, each 1.15 times the one
before) and stop when every radius of the grid is decided. This is a group-sequential
design with an alpha-spending function (Lan and DeMets):

- radius r is *certified* at look j when the count of votes for the guess reaches the
  look's boundary b_j(r): the smallest count for which the chance of a claim at p_A = p_r
  by look j, earlier looks included, is at most the alpha spent by then: three quarters
  of alpha over the early looks in proportion to their draws (less for a radius near
  the largest n can certify, `radius_share`), alpha at the last. The
  chance is computed exactly (`boundaries`), so the looks' strong correlation costs no
  alpha (a Clopper-Pearson test per look with alpha split over the looks, a union bound,
  spent alpha on claims the earlier looks had already made). With one look this is
  CERTIFY's test (`claim_boundary`);
- radius r is *futile* (given up, never claimed) when no remaining draw could bring the
  count to the last look's boundary, or, from `futility_from` estimation draws on,
  when the Clopper-Pearson upper bound u at level `futility` falls below p_r or, even with
  p_A = u, the chance that the remaining draws reach that boundary is below `futility`:
  giving up never makes a false claim, it only costs power, so `futility` trades samples
  against certified accuracy, not validity.

One alpha covers all radii at once: at every look the boundaries grow with the radius
(a claim at r is a claim at every smaller r) and futility at r gives up every larger r, so
a false claim anywhere implies a false claim at the smallest invalid radius r*, whose
probability is at most the chance that the count ever crosses r*'s boundaries, largest at
p_A = p_{r*}. `overclaim_probability` computes that chance exactly (dynamic programming
over the binomial increments between looks, ignoring futility and early stops, which only
remove claims); it is what sets the boundaries, and it shows that re-testing at the full
alpha after every stage over-claims.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_distribution
from scipy.stats import binom, norm

from smoothing import stats

# Chosen by simulation on two populations of p_A, one fitted to Cohen et al.'s ImageNet
# sigma = 0.5 results, one the digits CNN's (bench/sequential_designs.py, docs/scale.md).
# With exact boundaries more looks cost little alpha, so they come 1.15 apart (48 start at
# 15 draws when n = 10,000): a claim waits less for its look. The early looks spend three
# quarters of alpha in proportion to their draws, most of it late, where the claims that
# cost the most draws are made; the quarter left keeps the last look's boundaries within
# a few counts of CERTIFY's. Futility tested on a few dozen draws, look after look, gave
# up radii whose p_A was well above p_r: most of the accuracy lost to futility was lost
# before 400 draws, so futility waits for them.
LOOKS = 48
GROWTH = 1.15
EARLY_SHARE = 0.75
FUTILITY = 0.07
FUTILITY_FROM = 400
# What `decide` gives up on, as recorded in a run's settings (docs/scale.md).
FUTILITY_RULE = ("claim out of reach of every remaining draw; from futility_from draws on, "
                 "upper bound below p_r, or the last look's claim out of reach at it")
# How the boundaries are set, as recorded in a run's settings: files made under the
# earlier design (Clopper-Pearson per look, alpha split over the looks) are refused.
BOUNDARY_RULE = ("exact alpha spending: P(claim by look j | p_A = p_r) <= spent_j, "
                 "spent_j = share_r alpha n_j / n_(L-1) before the last look, alpha at it, "
                 "share_r = early_share (1 - log(alpha) / log(p_r) / n_(L-1))")


@dataclass(frozen=True)
class Design:
    """The looks (cumulative estimation draws), the thresholds p_r of the grid, and for
    each radius and look the smallest count that claims it (the look's draws + 1: none);
    the futility level and the draws before which only a claim out of reach of every
    remaining draw is given up. `spent`: for each radius, the alpha each look may have
    spent, cumulative (informative: the counts are what the test runs)."""

    looks: tuple[int, ...]
    p_thresholds: tuple[float, ...]
    counts: tuple[tuple[int, ...], ...]
    spent: tuple[tuple[float, ...], ...] = ()
    futility: float = FUTILITY
    futility_from: int = FUTILITY_FROM

    def __post_init__(self) -> None:
        if not self.looks or list(self.looks) != sorted(set(self.looks)) or self.looks[0] < 1:
            raise ValueError(f"looks must be increasing sample sizes >= 1, got {self.looks}")
        if len(self.counts) != len(self.p_thresholds) or any(
            len(row) != len(self.looks) for row in self.counts
        ):
            raise ValueError("need one count per look for each radius")
        if not 0 < self.futility < 1:
            raise ValueError(f"futility must lie in (0, 1), got {self.futility}")
        if self.futility_from < 0:
            raise ValueError(f"futility_from must be >= 0, got {self.futility_from}")

    def last_boundary(self, radius_index: int) -> int:
        """The smallest count of the last look's n that claims this radius (n + 1: none)."""
        return self.counts[radius_index][-1]


def look_sizes(n: int, looks: int = LOOKS, growth: float = GROWTH) -> tuple[int, ...]:
    """Looks growing geometrically up to n: n / g^(L-1), ..., n / g, n (rounded up), fewer
    when n is too small for L distinct ones (the first look has >= 1 draw)."""
    if n < 1 or looks < 1 or not growth > 1:
        raise ValueError(
            f"need n >= 1, looks >= 1 and growth > 1, got n={n}, looks={looks}, growth={growth}"
        )
    return tuple(sorted({max(1, math.ceil(n / growth**j)) for j in range(looks)}))


def spending(
    sizes: Sequence[int], alpha: float, early_share: float = EARLY_SHARE
) -> tuple[float, ...]:
    """The alpha that the claims by each look may cost, cumulative: `early_share` of alpha
    over the early looks in proportion to their draws (early_share * alpha * n_j / n_{L-1}),
    alpha itself at the last."""
    stats._check_alpha(alpha)
    if not 0 <= early_share < 1:
        raise ValueError(f"the early looks' share of alpha must lie in [0, 1), got {early_share}")
    if len(sizes) == 1:
        return (alpha,)
    return tuple(early_share * alpha * size / sizes[-2] for size in sizes[:-1]) + (alpha,)


def radius_share(
    threshold: float, alpha: float, sizes: Sequence[int], early_share: float = EARLY_SHARE
) -> float:
    """The early looks' share of alpha for one radius: `early_share`, less in proportion to
    the early draws before the first claim is possible at all.

    No count of m draws claims p_r before p_r^m <= alpha (every vote for the guess), so a
    radius near the largest one n can certify has few early looks that can claim; the
    alpha they would spend comes from a last look whose every count then costs accuracy
    (at p_r = 0.99865, n = 10,000, CERTIFY certifies with at most 3 votes against the
    guess). With early_share * (1 - m_r / n_{L-1}), m_r = log(alpha) / log(p_r), a radius
    far inside reach keeps nearly all of `early_share` (m_r = 10 draws at p_r = 1/2, 296 at
    Phi(2)), one near the edge little."""
    if len(sizes) == 1 or threshold >= 1.0:
        return 0.0
    reach = math.log(alpha) / math.log(threshold)
    return early_share * max(0.0, 1.0 - reach / sizes[-2])


@functools.lru_cache(maxsize=64)
def design(
    n: int, alpha: float, p_thresholds: tuple[float, ...], looks: int = LOOKS,
    futility: float = FUTILITY, growth: float = GROWTH, early_share: float = EARLY_SHARE,
    futility_from: int = FUTILITY_FROM,
) -> Design:
    """The design `certify --sequential` runs at these thresholds (cached: computed once per
    run, not per example): `look_sizes`, each radius' `spending` at its `radius_share`,
    and the boundaries each look's spent alpha allows (`boundaries`), raised where needed
    so that at every look they grow with the radius (claims stay monotone in the count;
    raising a boundary only removes claims)."""
    sizes = look_sizes(n, looks, growth)
    spent = [spending(sizes, alpha, radius_share(float(t), alpha, sizes, early_share))
             for t in p_thresholds]
    counts = np.array([boundaries(sizes, row, float(t))
                       for row, t in zip(spent, p_thresholds, strict=True)], dtype=int)
    counts = np.maximum.accumulate(counts, axis=0) if len(counts) else counts.reshape(0, 0)
    return Design(sizes, tuple(float(t) for t in p_thresholds),
                  tuple(tuple(int(c) for c in row) for row in counts),
                  tuple(spent), futility, futility_from)


def thresholds(radii: Sequence[float], sigma: float) -> np.ndarray:
    """p_r = Phi(r / sigma) for each radius: p_A must reach it for a radius r certificate."""
    stats._check_sigma(sigma)
    return norm.cdf(np.asarray(radii, dtype=float) / sigma)


def check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    """The grid, increasing, non-negative, with 0 (the decision itself) always in it."""
    values = [float(r) for r in radii]
    if not values:
        raise ValueError("give at least one radius")
    if any(not math.isfinite(r) or r < 0 for r in values):
        raise ValueError(f"radii must be finite and >= 0, got {values}")
    if values != sorted(values) or len(set(values)) != len(values):
        raise ValueError(f"radii must be strictly increasing, got {values}")
    return tuple(values) if values[0] == 0.0 else (0.0, *values)


def _upper_confidence_bound(n_a: int, n: int, level: float) -> float:
    return 1.0 if n_a >= n else float(beta_distribution.ppf(1 - level, n_a + 1, n - n_a))


@dataclass
class Decision:
    """Where the radii stand after a look: the largest certified one, the undecided ones."""

    certified: int = -1  # index into the grid of the largest certified radius, -1: none
    futile_from: int | None = None  # radii from this index on were given up

    def open_radii(self, count: int) -> range:
        end = count if self.futile_from is None else self.futile_from
        return range(self.certified + 1, end)


def decide(decision: Decision, n_a: int, n: int, plan: Design, look: int) -> bool:
    """Update `decision` with the count n_a of n at look `look`; True when all are decided."""
    radii = len(plan.p_thresholds)
    open_radii = decision.open_radii(radii)
    if not open_radii:
        return True
    for index in open_radii:
        if n_a >= plan.counts[index][look]:
            decision.certified = index
    if look == len(plan.looks) - 1:
        return True
    # Given up (costs power only, never validity): when not even every remaining draw
    # would bring the count to the last look's claim boundary, and, from futility_from
    # draws on, when the upper bound u at level `futility` falls below p_r or when, even
    # with p_A = u, the remaining draws would reach that boundary with probability below
    # `futility` (stochastic curtailment: p_A just above p_r, too close for n draws to
    # show it; the standard test would not claim r either).
    remaining = plan.looks[-1] - n
    upper = _upper_confidence_bound(n_a, n, plan.futility) if n >= plan.futility_from else None
    for index in decision.open_radii(radii):
        threshold = plan.p_thresholds[index]
        needed = plan.last_boundary(index) - n_a
        if needed > remaining or upper is not None and (
            upper < threshold or _reach_probability(needed, remaining, upper) < plan.futility
        ):
            decision.futile_from = index
            break
    return not decision.open_radii(radii)


def _reach_probability(needed: int, remaining: int, p: float) -> float:
    """P(at least `needed` of `remaining` draws vote for the guess) when each does with p."""
    if needed <= 0:
        return 1.0
    if needed > remaining:
        return 0.0
    return float(binom.sf(needed - 1, remaining, p))


def _claimed(lower: float, threshold: float) -> bool:
    # r = 0 (threshold 1/2) needs lower > 1/2, exactly as CERTIFY abstains at lower <= 1/2
    return lower > 0.5 and lower >= threshold


@functools.lru_cache(maxsize=256)
def claim_boundary(n: int, level: float, threshold: float) -> int:
    """CERTIFY's boundary: the smallest count k of n whose Clopper-Pearson lower bound at
    `level` claims `threshold` (n + 1: none). A one-look design has these counts, and
    naive re-testing at every look would use them.

    Found by bisection on the very test CERTIFY runs (the lower bound grows with k), so
    it costs log2(n) bounds and no memory in n."""
    low, high = 0, n + 1
    while low < high:
        middle = (low + high) // 2
        if _claimed(stats.lower_confidence_bound(middle, n, level), threshold):
            high = middle
        else:
            low = middle + 1
    return low


# Mass below this at the low end of the count is moved into the crossing probability
# (which stays an upper bound), so the arrays span the binomial's spread, not n.
_NEGLIGIBLE = 1e-30
# The spent alpha is met with this relative margin, for the float sums of the programme.
_MARGIN = 1e-9


def _binomial_increment(step: int, p: float) -> tuple[np.ndarray, int, float]:
    """pmf of Binomial(step, p) from its first count with cdf >= 1e-30 on (trailing exact
    zeros trimmed), that count, and the mass left below it."""
    start = max(0, int(binom.ppf(_NEGLIGIBLE, step, p)) - 1)
    pmf = binom.pmf(np.arange(start, step + 1), step, p)
    nonzero = np.flatnonzero(pmf)
    pmf = pmf[: nonzero[-1] + 1] if len(nonzero) else pmf[:1]
    return pmf, start, float(binom.cdf(start - 1, step, p)) if start else 0.0


def _crossing(sizes: Sequence[int], p: float, boundary_at) -> tuple[float, list[int]]:
    """Dynamic programme over the looks at p_A = p: the distribution of the count over the
    paths that have not crossed yet, advanced by the binomial increment between looks.
    `boundary_at(look, crossed, tails, offset)` gives the look's boundary (a count) from
    the crossing probability so far and tails[k] = P(count >= offset + k now, no crossing
    before). Returns (an upper bound on the chance that the count crosses some boundary,
    the boundaries). Less than 1e-30 of mass per look, at the low end, counts as crossing.
    """
    alive, offset, crossed, previous, found = np.ones(1), 0, 0.0, 0, []
    for index, size in enumerate(sizes):
        pmf, start, below = _binomial_increment(size - previous, p)
        crossed += below * float(alive.sum())  # dropped, counted as crossing
        alive, offset = np.convolve(alive, pmf), offset + start
        tails = np.append(np.cumsum(alive[::-1])[::-1], 0.0)  # tails[len(alive)] = 0
        boundary = int(boundary_at(index, crossed, tails, offset))
        found.append(boundary)
        cut = min(max(boundary - offset, 0), len(alive))
        crossed += float(tails[cut])
        alive = alive[:cut]
        dropped = int(np.searchsorted(np.cumsum(alive), _NEGLIGIBLE))
        crossed += float(alive[:dropped].sum())
        alive, offset, previous = alive[dropped:], offset + dropped, size
    return crossed, found


def boundaries(sizes: Sequence[int], spent: Sequence[float], threshold: float) -> list[int]:
    """For each look, the smallest count whose chance of a claim at p_A = `threshold` by
    that look, earlier looks included, is at most its `spent` alpha (less a relative 1e-9
    for the float sums); the look's draws + 1 where no count is."""
    def smallest(index: int, crossed: float, tails: np.ndarray, offset: int) -> int:
        if spent[index] <= 0:
            return sizes[index] + 1
        within = np.flatnonzero(crossed + tails <= spent[index] * (1 - _MARGIN))
        return offset + int(within[0]) if len(within) else sizes[index] + 1

    # (a boundary is at most size + 1: the window of alive counts ends at the look's draws)
    return _crossing(sizes, threshold, smallest)[1]


def overclaim_probability(plan: Design, radius_index: int, p: float | None = None) -> float:
    """P(the count crosses the radius' boundary at some look) when p_A = p.

    Exact, by the dynamic programme that sets the boundaries (less than 1e-30 of mass per
    look, at the low end, is counted as crossing: an upper bound). Futility and early
    stops are ignored: they only remove claims, so this bounds the implemented procedure.
    p defaults to the radius' threshold p_r, the worst case among p_A < p_r (crossing is
    monotone in p); the result must be <= alpha.
    """
    p = plan.p_thresholds[radius_index] if p is None else p
    counts = plan.counts[radius_index]
    return _crossing(plan.looks, p, lambda index, *_: counts[index])[0]


@dataclass(frozen=True)
class SequentialCertificate:
    """CERTIFY's answer on a grid: the class, the largest certified radius of the grid."""

    prediction: int
    radius: float
    samples: int  # noisy copies evaluated: selection (at most n0) and estimation draws


def certify_at_radii(
    smooth,  # smoothing.core.Smooth (not imported: core imports nothing from here either)
    x,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    radii: Sequence[float],
    generator,
    looks: int = LOOKS,
    futility: float = FUTILITY,
) -> SequentialCertificate:
    """CERTIFY at the radii of a grid, drawing the n estimation samples in stages.

    The class is guessed from n0 draws as in CERTIFY (`Smooth.guess`: the base classifier
    stops once no remaining selection draw could change the guess); then the estimation
    draws stop as soon as every radius is certified or given up. The radius returned is the largest
    certified radius of the grid (0.0 with ABSTAIN when not even r = 0 is), so a Cohen
    format row reads as usual; with probability >= 1 - alpha it is a true certificate.
    """
    guess, selection = smooth.guess(x, n0, batch_size, generator)
    certificate = certify_guess_at_radii(
        smooth, x, guess, n, alpha, batch_size, radii, generator, looks, futility
    )
    return SequentialCertificate(
        certificate.prediction, certificate.radius, selection + certificate.samples
    )


def certify_guess_at_radii(
    smooth,
    x,
    guess: int,
    n: int,
    alpha: float,
    batch_size: int,
    radii: Sequence[float],
    generator,
    looks: int = LOOKS,
    futility: float = FUTILITY,
) -> SequentialCertificate:
    """The estimation stage of `certify_at_radii` for a class already guessed from
    independent selection draws; `samples` counts the estimation draws only."""
    grid = check_radii(radii)
    p_thresholds = thresholds(grid, smooth.sigma)
    plan = design(n, alpha, tuple(float(t) for t in p_thresholds), looks, futility)
    decision = Decision()
    n_a = drawn = 0
    for look, size in enumerate(plan.looks):
        counts = smooth.sample_counts(x, size - drawn, batch_size, generator)
        n_a += int(counts[guess].item())
        drawn = size
        if decide(decision, n_a, drawn, plan, look):
            break
    if decision.certified < 0:
        return SequentialCertificate(stats.ABSTAIN, 0.0, drawn)
    return SequentialCertificate(guess, grid[decision.certified], drawn)
