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
# (stochastic curtailment, futility at every look), and levels from 400 draws (the default
# is 0.07 from 400)
CASES = [(0.05, 0, "first"), (0.05, 0, "current"), (0.05, 400, "current"),
         (0.07, 400, "current"), (0.1, 400, "current"), (0.15, 400, "current")]
# Other looks and spending, at the default futility (--variations): name, growth, looks,
# the early looks' share of alpha (early_share * alpha * n_j / n_(L-1) spent by look j).
VARIATIONS = [
    ("default: 48 looks 1.15 apart, three quarters of alpha over the early looks",
     1.15, 48, 0.75),
    ("30 looks 1.25 apart", 1.25, 30, 0.75),
    ("64 looks 1.1 apart", 1.1, 64, 0.75),
    ("half of alpha over the early looks", 1.15, 48, 0.5),
    ("87% of alpha over the early looks (alpha n_j / n)", 1.15, 48, 0.87),
    ("95% of alpha over the early looks", 1.15, 48, 0.95),
]


def variation(growth: float, looks: int, early_share: float,
              futility: float = sequential.FUTILITY, n: int = N) -> sequential.Design:
    """The engine's design at the grid with other looks or another share of alpha."""
    return sequential.design(n, ALPHA, THRESHOLDS, looks, futility, growth, early_share)


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
             rng: np.random.Generator) -> dict:
    """Estimation draws (selection included) over CERTIFY's, and certified accuracy (%) at
    the grid of the sequential rule and of CERTIFY at n (the plan's last look), the guess
    taken as right."""
    n, p_thresholds = plan.looks[-1], plan.p_thresholds
    radii = len(p_thresholds)
    drawn_total, sequential_hits, standard_hits = 0, np.zeros(radii), np.zeros(radii)
    full_n_examples = full_n_draws = 0
    for _ in range(repetitions):
        for p in p_as:
            decision, n_a, drawn = sequential.Decision(), 0, 0
            for look, size in enumerate(plan.looks):
                n_a += rng.binomial(size - drawn, p)
                drawn = size
                if sequential.decide(decision, n_a, drawn, plan, look):
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
        plan = sequential.design(n, ALPHA, p_thresholds)
        result = simulate(p_as, plan, repetitions, rng)
        gap = np.subtract(result["sequential"], result["standard"])
        print(f"{name} ({len(p_as)} examples): {result['draws']:.3f} of CERTIFY's draws; "
              f"accuracy [{' '.join(f'{g:+.1f}' for g in gap)}], standard "
              f"[{' '.join(f'{a:.1f}' for a in result['standard'])}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variations", action="store_true",
                        help="compare looks and spending instead of futility rules")
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
               sequential.design(args.n, ALPHA, THRESHOLDS, futility=f, futility_from=start),
               rule)
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
