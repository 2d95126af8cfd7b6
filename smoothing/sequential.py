"""Certified accuracy at a set of radii with as few samples as the statistics allow.

What papers report is "is x certified at radius r?" for a few r. Cohen et al.'s CERTIFY
answers it with n estimation draws whatever p_A is; most examples are decided long
before: p_A far above or far below the threshold Phi(r / sigma). Here the estimation
draws come in stages (looks at n_1 < ... < n_L = n, each 1.25 times the one before) and
stop when every radius of the grid is decided. This is a group-sequential design:

- at an early look j, radius r is *certified* when the one-sided Clopper-Pearson lower
  bound on p_A at level alpha_j reaches p_r = Phi(r / sigma) (r = 0: exceeds 1/2, as
  CERTIFY); alpha_1 + ... + alpha_{L-1} = alpha / 2, in proportion to the square root of
  the looks' draws;
- at the last look, r is certified when the count reaches the smallest boundary whose
  chance of a claim at p_A = p_r, early looks included, is at most alpha: computed
  exactly (`exact_last_look`), it spends what the early looks leave of alpha (a union
  bound would give the last look alpha / 2; here it gets alpha itself where the early
  looks cannot claim, as near the largest radius n draws can certify);
- radius r is *futile* (given up, never claimed) when no remaining draw could bring the
  count to the last look's claim boundary, or, from `futility_from` estimation draws on,
  when the Clopper-Pearson upper bound u at level `futility` falls below p_r or, even with
  p_A = u, the chance that the remaining draws reach that boundary is below `futility`:
  giving up never makes a false claim, it only costs power, so `futility` trades samples
  against certified accuracy, not validity.

One alpha covers all radii at once: claims are monotone in the count (a claim at r is a
claim at every smaller r) and futility at r gives up every larger r, so a false claim
anywhere implies a false claim at the smallest invalid radius r*, whose probability is
at most the chance that the count ever crosses r*'s boundary, largest at p_A = p_{r*}.
`overclaim_probability` computes that chance exactly (dynamic programming over the
binomial increments between looks, ignoring futility and early stops, which only remove
claims); the last look's boundaries are set by the same computation, and the same
computation shows that re-testing at the full alpha after every stage over-claims.
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
# Looks 1.25 apart with the early alpha weighted by sqrt(n_j) drew 8% less than 20 looks
# sqrt(2) apart with it spread evenly (a claim waits less for its look, and the later
# looks, where the claims that cost the most draws are made, test at a larger alpha); 30
# of them start at 16 draws when n = 10,000. Futility tested on a few dozen draws, look
# after look, gave up radii whose p_A was well above p_r: most of the accuracy lost to
# futility was lost before 400 draws, so futility waits for them (and, made that safe,
# may stop at a higher level).
LOOKS = 30
GROWTH = 1.25
FUTILITY = 0.1
FUTILITY_FROM = 400
# What `decide` gives up on, as recorded in a run's settings (docs/scale.md).
FUTILITY_RULE = ("claim out of reach of every remaining draw; from futility_from draws on, "
                 "upper bound below p_r, or the last look's claim out of reach at it")


@dataclass(frozen=True)
class Design:
    """The looks (cumulative estimation draws), each look's alpha, the futility level and
    the draws before which only a claim out of reach of every remaining draw is given up."""

    looks: tuple[int, ...]
    alphas: tuple[float, ...]
    futility: float = FUTILITY
    futility_from: int = FUTILITY_FROM
    # The last look's claim boundary (a count) for each radius of the grid, set by
    # `exact_last_look`; empty: the Clopper-Pearson test at alphas[-1] (union bound).
    last_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.looks or list(self.looks) != sorted(set(self.looks)) or self.looks[0] < 1:
            raise ValueError(f"looks must be increasing sample sizes >= 1, got {self.looks}")
        if len(self.alphas) != len(self.looks) or not all(0 < a < 1 for a in self.alphas):
            raise ValueError("need one alpha in (0, 1) per look")
        if not 0 < self.futility < 1:
            raise ValueError(f"futility must lie in (0, 1), got {self.futility}")
        if self.futility_from < 0:
            raise ValueError(f"futility_from must be >= 0, got {self.futility_from}")

    @property
    def alpha(self) -> float:
        return math.fsum(self.alphas)

    def last_boundary(self, radius_index: int | None, threshold: float) -> int:
        """The smallest count of the last look's n that claims this radius (n + 1: none)."""
        if self.last_counts:
            if radius_index is None:
                raise ValueError("a design with exact last-look counts needs the radius index")
            return self.last_counts[radius_index]
        return claim_boundary(self.looks[-1], self.alphas[-1], float(threshold))


def design(
    n: int, alpha: float, looks: int = LOOKS, futility: float = FUTILITY,
    growth: float = GROWTH, futility_from: int = FUTILITY_FROM,
) -> Design:
    """Looks growing geometrically up to n (n / g^(L-1), ..., n / g, n), half of alpha at
    the last, the other half over the earlier ones in proportion to sqrt(n_j).

    Fewer looks when n is too small for L distinct ones (the first look has >= 1 draw).
    """
    if n < 1 or looks < 1 or not growth > 1:
        raise ValueError(
            f"need n >= 1, looks >= 1 and growth > 1, got n={n}, looks={looks}, growth={growth}"
        )
    stats._check_alpha(alpha)
    sizes = sorted({max(1, math.ceil(n / growth**j)) for j in range(looks)})
    if len(sizes) == 1:
        return Design((n,), (alpha,), futility, futility_from)
    # spend the alpha in float, then trim so the float sum never exceeds alpha
    weights = [math.sqrt(size) for size in sizes[:-1]]
    total = math.fsum(weights)
    alphas = [alpha / 2 * weight / total for weight in weights] + [alpha / 2]
    while math.fsum(alphas) > alpha:
        alphas[-1] = math.nextafter(alphas[-1], 0.0)
    return Design(tuple(sizes), tuple(alphas), futility, futility_from)


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


def _claimed(lower: float, threshold: float) -> bool:
    # r = 0 (threshold 1/2) needs lower > 1/2, exactly as CERTIFY abstains at lower <= 1/2
    return lower > 0.5 and lower >= threshold


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


def decide(
    decision: Decision, n_a: int, n: int, plan: Design, look: int, p_thresholds: np.ndarray
) -> bool:
    """Update `decision` with the count n_a of n at look `look`; True when all are decided."""
    open_radii = decision.open_radii(len(p_thresholds))
    if not open_radii:
        return True
    if look == len(plan.looks) - 1:
        for index in open_radii:
            if n_a >= plan.last_boundary(index, p_thresholds[index]):
                decision.certified = index
        return True
    lower = stats.lower_confidence_bound(n_a, n, plan.alphas[look])
    for index in open_radii:
        if _claimed(lower, p_thresholds[index]):
            decision.certified = index
    # Given up (costs power only, never validity): when not even every remaining draw
    # would bring the count to the last look's claim boundary, and, from futility_from
    # draws on, when the upper bound u at level `futility` falls below p_r or when, even
    # with p_A = u, the remaining draws would reach that boundary with probability below
    # `futility` (stochastic curtailment: p_A just above p_r, too close for n draws to
    # show it; the standard test would not claim r either).
    remaining = plan.looks[-1] - n
    upper = _upper_confidence_bound(n_a, n, plan.futility) if n >= plan.futility_from else None
    for index in decision.open_radii(len(p_thresholds)):
        threshold = p_thresholds[index]
        needed = plan.last_boundary(index, threshold) - n_a
        if needed > remaining or upper is not None and (
            upper < threshold or _reach_probability(needed, remaining, upper) < plan.futility
        ):
            decision.futile_from = index
            break
    return not decision.open_radii(len(p_thresholds))


def _reach_probability(needed: int, remaining: int, p: float) -> float:
    """P(at least `needed` of `remaining` draws vote for the guess) when each does with p."""
    if needed <= 0:
        return 1.0
    if needed > remaining:
        return 0.0
    return float(binom.sf(needed - 1, remaining, p))


@functools.lru_cache(maxsize=256)
def claim_boundary(n: int, look_alpha: float, threshold: float) -> int:
    """The smallest count k of n with a claim at `threshold` (n + 1: none) by the
    Clopper-Pearson test at `look_alpha`: an early look's boundary, in `decide` and in the
    DP (cached: one per look and radius).

    Found by bisection on the very test `decide` runs (the lower bound grows with k), so
    it costs log2(n) bounds and no memory in n."""
    low, high = 0, n + 1
    while low < high:
        middle = (low + high) // 2
        if _claimed(stats.lower_confidence_bound(middle, n, look_alpha), threshold):
            high = middle
        else:
            low = middle + 1
    return low


# Mass below this at the low end of the count is moved into the crossing probability
# (which stays an upper bound), so the arrays span the binomial's spread, not n.
_NEGLIGIBLE = 1e-30


def _binomial_increment(step: int, p: float) -> tuple[np.ndarray, int, float]:
    """pmf of Binomial(step, p) from its first count with cdf >= 1e-30 on (trailing exact
    zeros trimmed), that count, and the mass left below it."""
    start = max(0, int(binom.ppf(_NEGLIGIBLE, step, p)) - 1)
    pmf = binom.pmf(np.arange(start, step + 1), step, p)
    nonzero = np.flatnonzero(pmf)
    pmf = pmf[: nonzero[-1] + 1] if len(nonzero) else pmf[:1]
    return pmf, start, float(binom.cdf(start - 1, step, p)) if start else 0.0


def _early_looks(design: Design, threshold: float, p: float) -> tuple[float, np.ndarray, int]:
    """Dynamic programme over the looks before the last at p_A = p: (an upper bound on the
    chance that the count crosses a claim boundary at `threshold` there, alive, offset),
    alive[k] = P(count = offset + k at the last look, no crossing before)."""
    alive, offset, crossed, previous = np.ones(1), 0, 0.0, 0
    last = len(design.looks) - 1
    for index, look in enumerate(design.looks):
        pmf, start, below = _binomial_increment(look - previous, p)
        crossed += below * float(alive.sum())  # dropped, counted as crossing
        alive, offset = np.convolve(alive, pmf), offset + start
        if index < last:
            boundary = max(0, claim_boundary(look, design.alphas[index], threshold) - offset)
            crossed += float(alive[boundary:].sum())
            alive = alive[:boundary]
            dropped = int(np.searchsorted(np.cumsum(alive), _NEGLIGIBLE))
            crossed += float(alive[:dropped].sum())
            alive, offset = alive[dropped:], offset + dropped
            previous = look
    return crossed, alive, offset


def overclaim_probability(
    design: Design, threshold: float, p: float | None = None, radius_index: int | None = None
) -> float:
    """P(the count crosses the claim boundary at `threshold` at some look) when p_A = p.

    Exact, by dynamic programming: the distribution of the count over the paths that have
    not crossed yet, advanced by the binomial increment between looks (less than 1e-30 of
    mass per look, at the low end, is counted as crossing: an upper bound). Futility and
    early stops are ignored: they only remove claims, so this bounds the implemented
    procedure. p defaults to the threshold itself, the worst case among p_A < threshold
    (crossing is monotone in p); the result must be <= alpha. `radius_index` picks the
    last look's count of a design from `exact_last_look`.
    """
    p = threshold if p is None else p
    crossed, alive, offset = _early_looks(design, threshold, p)
    boundary = max(0, design.last_boundary(radius_index, threshold) - offset)
    return crossed + float(alive[boundary:].sum())


def exact_last_look(plan: Design, p_thresholds: Sequence[float], alpha: float) -> Design:
    """`plan` with the last look's claim boundary of each radius set exactly: the smallest
    count whose chance of a claim at p_A = p_r, the early looks' crossings included, is at
    most alpha (less a relative 1e-9 for the float sums). Raised where needed so that the
    boundaries grow with the radius (claims stay monotone in the count); a boundary at
    or below the union bound's, at or above CERTIFY's at alpha with one look."""
    limit = alpha * (1 - 1e-9)
    counts = []
    for threshold in p_thresholds:
        crossed, alive, offset = _early_looks(plan, float(threshold), float(threshold))
        # tail[k] = P(count >= offset + k, no early crossing); tail[len] = 0
        tail = np.append(np.cumsum(alive[::-1])[::-1], 0.0)
        within = np.flatnonzero(crossed + tail <= limit)
        boundary = offset + int(within[0]) if len(within) else plan.looks[-1] + 1
        counts.append(min(boundary, plan.looks[-1] + 1))
    for index in range(1, len(counts)):
        counts[index] = max(counts[index], counts[index - 1])
    return Design(plan.looks, plan.alphas, plan.futility, plan.futility_from, tuple(counts))


@functools.lru_cache(maxsize=64)
def grid_design(
    n: int, alpha: float, p_thresholds: tuple[float, ...], looks: int = LOOKS,
    futility: float = FUTILITY,
) -> Design:
    """The design `certify --sequential` runs at these thresholds: `design` with its last
    look set by `exact_last_look` (cached: computed once per run, not per example)."""
    return exact_last_look(design(n, alpha, looks, futility), p_thresholds, alpha)


@dataclass(frozen=True)
class SequentialCertificate:
    """CERTIFY's answer on a grid: the class, the largest certified radius of the grid."""

    prediction: int
    radius: float
    samples: int  # noisy copies drawn: n0 selection draws plus the estimation draws used


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

    The class is guessed from n0 draws as in CERTIFY; then the estimation draws stop as
    soon as every radius is certified or given up. The radius returned is the largest
    certified radius of the grid (0.0 with ABSTAIN when not even r = 0 is), so a Cohen
    format row reads as usual; with probability >= 1 - alpha it is a true certificate.
    """
    guess = int(np.argmax(smooth.sample_counts(x, n0, batch_size, generator).cpu().numpy()))
    certificate = certify_guess_at_radii(
        smooth, x, guess, n, alpha, batch_size, radii, generator, looks, futility
    )
    return SequentialCertificate(
        certificate.prediction, certificate.radius, n0 + certificate.samples
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
    plan = grid_design(n, alpha, tuple(float(t) for t in p_thresholds), looks, futility)
    decision = Decision()
    n_a = drawn = 0
    for look, size in enumerate(plan.looks):
        counts = smooth.sample_counts(x, size - drawn, batch_size, generator)
        n_a += int(counts[guess].item())
        drawn = size
        if decide(decision, n_a, drawn, plan, look, p_thresholds):
            break
    if decision.certified < 0:
        return SequentialCertificate(stats.ABSTAIN, 0.0, drawn)
    return SequentialCertificate(guess, grid[decision.certified], drawn)
