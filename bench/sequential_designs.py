"""The futility rules and levels of `certify --sequential`, compared by simulation.

`python -m bench.sequential_designs` feeds binomial counts of known p_A to the engine's own
decision rule (`smoothing.sequential.decide`) at each look, against CERTIFY at n on the same
draws (the path continued to n, as `bench.sequential` pairs its two runs), for the two
populations of `bench.sequential` (p_A fitted to Cohen et al.'s ImageNet sigma 0.5
results; the digits CNN's p_A as estimated by a standard run). Counts instead of a
classifier make repetitions cheap, so accuracy differences are not one run's noise.
"first" is the rule before stochastic curtailment: a radius is given up only when its
upper bound falls below p_r or its claim is out of reach of every remaining draw; the
cases also vary the level and how many draws futility waits for (docs/scale.md).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from bench.sequential import (
    ALPHA,
    GRID,
    N0,
    REFERENCE,
    SIGMA,
    N,
    fitted_p_as,
    p_a_from_radius,
)
from smoothing import sequential, stats
from smoothing.core import Smooth

THRESHOLDS = tuple(float(t) for t in sequential.thresholds(GRID, SIGMA))
# futility level, draws before futility applies, rule: the first version, the second
# (stochastic curtailment, futility at every look), and the default (futility from 400)
CASES = [(0.05, 0, "first"), (0.05, 0, "current"), (0.02, 0, "current"),
         (0.05, 400, "current"), (0.1, 400, "current"), (0.2, 400, "current")]
# Other looks and alpha splits, at the default futility (--variations): name, first look
# (at least), growth, share of alpha at the last look, weights of the earlier looks' alpha.
VARIATIONS = [
    ("default: 30 looks from 16 draws, growth 1.25, early alpha by sqrt(n_j)",
     1, 1.25, 0.5, "sqrt"),
    ("the previous looks: from 14 draws, growth sqrt(2), early alpha even",
     13, 2**0.5, 0.5, "even"),
    ("from 116 draws", 100, 1.25, 0.5, "sqrt"),
    ("growth 1.15", 15, 1.15, 0.5, "sqrt"),
    ("two thirds of alpha over the early looks", 15, 1.25, 1 / 3, "sqrt"),
    ("early alpha even", 15, 1.25, 0.5, "even"),
]


def variation(first: int, growth: float, last_share: float, weights: str,
              futility: float = sequential.FUTILITY, n: int = N) -> sequential.Design:
    """Looks n, n / growth, ... down to `first`; 1 - `last_share` of alpha over the early
    looks, evenly or by the square root of their size, and the last look's counts set
    exactly (`exact_last_look`), as the engine does. `first` 1 is the default design (30
    looks, growth 1.25, 0.5, sqrt)."""
    if first == 1:
        return sequential.grid_design(n, ALPHA, tuple(THRESHOLDS), futility=futility)
    sizes, size = [], float(n)
    while size >= first:
        sizes.append(int(np.ceil(size)))
        size /= growth
    sizes = sorted(set(sizes))
    early = np.ones(len(sizes) - 1) if weights == "even" else np.sqrt(sizes[:-1])
    alphas = [*(ALPHA * (1 - last_share) * early / early.sum()), ALPHA * last_share]
    while sum(alphas) > ALPHA:
        alphas[-1] = np.nextafter(alphas[-1], 0.0)
    plan = sequential.Design(tuple(sizes), tuple(float(a) for a in alphas), futility)
    return sequential.exact_last_look(plan, THRESHOLDS, ALPHA)


@contextlib.contextmanager
def first_rule() -> Iterator[None]:
    """The first version's futility: a claim counts as reachable unless it is impossible."""
    current = sequential._reach_probability

    def reachable(needed: int, remaining: int, p: float) -> float:
        return 0.0 if needed > remaining else 1.0

    sequential._reach_probability = reachable
    try:
        yield
    finally:
        sequential._reach_probability = current


def simulate(p_as: np.ndarray, plan: sequential.Design, repetitions: int,
             rng: np.random.Generator, p_thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """Estimation draws (selection included) over CERTIFY's, and certified accuracy (%) at
    the grid of the sequential rule and of CERTIFY at n (the plan's last look), the guess
    taken as right."""
    n = plan.looks[-1]
    radii = len(p_thresholds)
    drawn_total, sequential_hits, standard_hits = 0, np.zeros(radii), np.zeros(radii)
    full_n_examples = full_n_draws = 0
    for _ in range(repetitions):
        for p in p_as:
            decision, n_a, drawn = sequential.Decision(), 0, 0
            for look, size in enumerate(plan.looks):
                n_a += rng.binomial(size - drawn, p)
                drawn = size
                if sequential.decide(decision, n_a, drawn, plan, look, p_thresholds):
                    break
            drawn_total += N0 + drawn
            if drawn == n:
                full_n_examples, full_n_draws = full_n_examples + 1, full_n_draws + N0 + n
            sequential_hits[: decision.certified + 1] += 1
            # CERTIFY's count at n on the same draws: the path continued to n
            count = n_a + int(rng.binomial(n - drawn, p))
            lower = stats.lower_confidence_bound(count, n, ALPHA)
            standard_hits += [sequential._claimed(lower, t) for t in p_thresholds]
    examples = repetitions * len(p_as)
    return {"draws": drawn_total / examples / (N0 + n),
            # the examples that used every draw, and their share of all draws
            "full_n_examples": full_n_examples / examples,
            "full_n_draws": full_n_draws / drawn_total,
            "sequential": list(100 * sequential_hits / examples),
            "standard": list(100 * standard_hits / examples)}


def cohen_p_as() -> np.ndarray:
    return np.array(fitted_p_as(REFERENCE))


def digits_p_as() -> np.ndarray:
    """The p-hat each digit's standard CERTIFY radius came from (0.45 where it abstained)."""
    from classifiers import build_classifier, build_dataset

    dataset = build_dataset("digits", split="test")
    model = build_classifier("digits-sigma0.50", class_names=dataset.classes, sigma=SIGMA)
    smooth = Smooth(model, len(dataset.classes), SIGMA)
    p_as = []
    for index in range(len(dataset)):
        generator = torch.Generator().manual_seed(index)
        prediction, radius = smooth.certify(dataset[index][0], N0, N, ALPHA, 1000, generator)
        p_as.append(0.45 if prediction == stats.ABSTAIN else p_a_from_radius(radius, n=N))
    return np.array(p_as)


# Cohen et al.'s other published runs (each at the sigma it was trained at): not used to
# choose the design, so they test it out of sample (--other-populations)
OTHER_POPULATIONS = [f"{data}_noise_{sigma}_test_sigma_{sigma}.tsv"
                     for data in ("imagenet_resnet50", "cifar10_resnet110")
                     for sigma in ("0.25", "0.50", "1.00")]


def other_populations(n: int, grid: tuple[float, ...], repetitions: int,
                      rng: np.random.Generator) -> None:
    """The default design on each of OTHER_POPULATIONS, p_A fitted as for the Cohen one."""
    for name in OTHER_POPULATIONS:
        sigma = float(name.rsplit("_", 1)[1].removesuffix(".tsv"))
        p_as = np.array(fitted_p_as(REFERENCE.parent / name, sigma))
        p_thresholds = tuple(float(t) for t in sequential.thresholds(grid, sigma))
        plan = sequential.grid_design(n, ALPHA, p_thresholds)
        result = simulate(p_as, plan, repetitions, rng, p_thresholds)
        gap = np.subtract(result["sequential"], result["standard"])
        print(f"{name} ({len(p_as)} examples): {result['draws']:.3f} of CERTIFY's draws; "
              f"accuracy [{' '.join(f'{g:+.1f}' for g in gap)}], standard "
              f"[{' '.join(f'{a:.1f}' for a in result['standard'])}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variations", action="store_true",
                        help="compare looks and alpha splits instead of futility rules")
    parser.add_argument("--other-populations", action="store_true",
                        help="the default design on Cohen et al.'s six other published runs "
                             "(out of sample), at --radii")
    parser.add_argument("--radii", default=",".join(map(str, GRID)),
                        help="with --other-populations: the grid")
    parser.add_argument("--n", type=int, default=N,
                        help="estimation draws of CERTIFY (Cohen et al.'s ImageNet runs: "
                             "100,000; the digits' p_A still come from a run at 10,000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    if args.other_populations:
        grid = sequential.check_radii([float(r) for r in args.radii.split(",")])
        print(f"n = {args.n:,}, {args.repetitions} repetitions, grid {grid}; accuracy: "
              "sequential minus standard, points")
        other_populations(args.n, grid, args.repetitions, rng)
        return
    populations = {"cohen": cohen_p_as(), "digits": digits_p_as()}
    print(f"n = {args.n:,}, {args.repetitions} repetitions; accuracy: sequential minus "
          "standard, points, "
          f"at r = {', '.join(map(str, GRID))}")
    cases = ([(name, variation(*shape, n=args.n), "current") for name, *shape in VARIATIONS]
             if args.variations else
             [(f"futility {f} from {start} draws, {rule} rule",
               sequential.exact_last_look(
                   sequential.design(args.n, ALPHA, futility=f, futility_from=start),
                   THRESHOLDS, ALPHA), rule)
              for f, start, rule in CASES])
    for name, plan, rule in cases:
        cells = []
        with first_rule() if rule == "first" else contextlib.nullcontext():
            for population, p_as in populations.items():
                result = simulate(p_as, plan, args.repetitions, rng)
                gap = np.subtract(result["sequential"], result["standard"])
                cells.append(f"{population} {result['draws']:.3f} "
                             f"[{' '.join(f'{g:+.1f}' for g in gap)}] all n: "
                             f"{result['full_n_examples']:.2f} of examples, "
                             f"{result['full_n_draws']:.2f} of draws")
        print(f"{name} ({len(plan.looks)} looks from {plan.looks[0]}): " + "  ".join(cells),
              flush=True)

if __name__ == "__main__":
    main()
