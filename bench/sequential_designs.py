"""The futility rules and levels of `certify --sequential`, compared by simulation.

`python -m bench.sequential_designs` feeds binomial counts of known p_A to the engine's own
decision rule (`smoothing.sequential.decide`) at each look, against CERTIFY at n on fresh
counts, for the two populations of `bench.sequential` (p_A fitted to Cohen et al.'s
ImageNet sigma 0.5 results; the digits CNN's p_A as estimated by a standard run). Counts
instead of a classifier make repetitions cheap, so accuracy differences are not one
run's noise. "first" is the rule before stochastic curtailment: a radius is given up only
when its upper bound falls below p_r or its claim is out of reach of every remaining
draw (docs/scale.md).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from bench.sequential import ALPHA, GRID, N0, REFERENCE, SIGMA, N, p_a_from_radius
from smoothing import sequential, stats
from smoothing.core import Smooth

THRESHOLDS = sequential.thresholds(GRID, SIGMA)
CASES = [(0.05, "first"), (0.05, "current"), (0.02, "current"), (0.01, "first"),
         (0.01, "current")]


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


def simulate(p_as: np.ndarray, futility: float, repetitions: int,
             rng: np.random.Generator) -> dict:
    """Estimation draws (selection included) over CERTIFY's, and certified accuracy (%) at
    the grid of the sequential rule and of CERTIFY at n, the guess taken as right."""
    plan = sequential.design(N, ALPHA, futility=futility)
    drawn_total, sequential_hits, standard_hits = 0, np.zeros(len(GRID)), np.zeros(len(GRID))
    full_n_examples = full_n_draws = 0
    for _ in range(repetitions):
        for p in p_as:
            decision, n_a, drawn = sequential.Decision(), 0, 0
            for look, size in enumerate(plan.looks):
                n_a += rng.binomial(size - drawn, p)
                drawn = size
                if sequential.decide(decision, n_a, drawn, plan, look, THRESHOLDS):
                    break
            drawn_total += N0 + drawn
            if drawn == N:
                full_n_examples, full_n_draws = full_n_examples + 1, full_n_draws + N0 + N
            sequential_hits[: decision.certified + 1] += 1
            lower = stats.lower_confidence_bound(int(rng.binomial(N, p)), N, ALPHA)
            standard_hits += [sequential._claimed(lower, t) for t in THRESHOLDS]
    examples = repetitions * len(p_as)
    return {"draws": drawn_total / examples / (N0 + N),
            # the examples that used every draw, and their share of all draws
            "full_n_examples": full_n_examples / examples,
            "full_n_draws": full_n_draws / drawn_total,
            "sequential": list(100 * sequential_hits / examples),
            "standard": list(100 * standard_hits / examples)}


def cohen_p_as() -> np.ndarray:
    rows = [line.split("\t") for line in REFERENCE.read_text().splitlines()[1:]]
    return np.array([0.45 if int(r[2]) == -1 else p_a_from_radius(float(r[3])) for r in rows])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    populations = {"cohen": cohen_p_as(), "digits": digits_p_as()}
    rng = np.random.default_rng(args.seed)
    print(f"{args.repetitions} repetitions; accuracy: sequential minus standard, points, "
          f"at r = {', '.join(map(str, GRID))}")
    for futility, rule in CASES:
        cells = []
        with first_rule() if rule == "first" else contextlib.nullcontext():
            for name, p_as in populations.items():
                result = simulate(p_as, futility, args.repetitions, rng)
                gap = np.subtract(result["sequential"], result["standard"])
                cells.append(f"{name} {result['draws']:.3f} [{' '.join(f'{g:+.1f}' for g in gap)}]"
                             f" all n: {result['full_n_examples']:.2f} of examples, "
                             f"{result['full_n_draws']:.2f} of draws")
        print(f"futility {futility} {rule:<7} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
