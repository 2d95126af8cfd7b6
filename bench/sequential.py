"""Samples evaluated by sequential certification at a grid of radii, against CERTIFY at full n.

Two populations, each certified both ways at n = 10,000, alpha = 0.001, sigma = 0.5, on
the grid 0, 0.25, ..., 1.0 (the radii papers tabulate):

- the digits test split with the digits CNN trained at sigma 0.5 (the real code path);
- 500 values of p_A fitted to Cohen et al.'s ImageNet ResNet-50 sigma = 0.5 results
  (`../shared/reference/cohen2019/`): each row's radius is turned back into the p_A
  whose Clopper-Pearson bound at their n = 100,000 gives it; an abstention becomes
  p_A = 0.45 with the rest split over two other classes. A classifier of known p_A
  (class 0 iff the first noisy pixel is below sigma * Phi^-1(p_A)) then plays each.

Reported: the ratio of noisy samples the base classifier evaluated (selection included: the
sequential form stops its selection once the guess is settled) and the certified accuracy
at each radius of the grid both ways; `--repetitions K` pools K runs of each example on
other seeds, so the accuracy difference is less one run's luck. Sample counts, not
seconds: the saving is the same for any model.

The two ways are paired (common random numbers): both start from the same seed, so
CERTIFY's selection draws are the sequential run's (which evaluates only those that settle
the guess, but draws all n0) and its n estimation draws begin with the sequential run's
(the noise is drawn in runs of 16 elements, and each input here is a multiple of 16, so
splitting a draw into looks does not change it). The accuracy difference is then the
design's own (alpha spending, futility), not the noise of two independent runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.stats import beta, norm
from torch import nn

from smoothing.core import Smooth
from smoothing.sequential import certify_at_radii

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
SIGMA, N0, N, ALPHA = 0.5, 100, 10_000, 0.001
REFERENCE = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "cohen2019"
    / "imagenet_resnet50_noise_0.50_test_sigma_0.50.tsv"
)


class KnownProbability(nn.Module):
    """Class 0 with probability p_A under the noise of the input 0, else class 1 or 2."""

    def __init__(self, p_a: float):
        super().__init__()
        self.t = SIGMA * float(norm.ppf(p_a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = x.flatten(1)[:, 0], x.flatten(1)[:, 1]
        votes = torch.where(first < self.t, 0, torch.where(second < 0, 1, 2))
        return nn.functional.one_hot(votes, 3).float()


def p_a_from_radius(
    radius: float, n: int = 100_000, alpha: float = 0.001, sigma: float = SIGMA
) -> float:
    """The p-hat whose one-sided Clopper-Pearson bound at n gives `radius` at sigma."""
    lower = norm.cdf(radius / sigma)

    def gap(p: float) -> float:
        return float(beta.ppf(alpha, p * n, n - p * n + 1)) - lower

    try:
        return brentq(gap, lower, 1 - 1e-12)
    except ValueError:  # the largest radius n draws can give: p-hat = 1
        return 1 - 1e-9


def _both_ways(smooth: Smooth, x: torch.Tensor, seed: int) -> tuple[int, float, int, float, int]:
    """(sequential class, radius, standard class, radius, samples drawn sequentially), on
    the same noise (paired: see the module's docstring)."""
    if x.numel() % 16:
        raise ValueError(f"an input of {x.numel()} elements: the looks would not split the "
                         "noise of the standard run (torch draws it in runs of 16)")
    sequential = certify_at_radii(
        smooth, x, N0, N, ALPHA, N, GRID, torch.Generator().manual_seed(seed)
    )
    prediction, radius = smooth.certify(x, N0, N, ALPHA, N, torch.Generator().manual_seed(seed))
    return sequential.prediction, sequential.radius, prediction, radius, sequential.samples


def wald_bound(p_a: float, standard_radius: float | None) -> float:
    """Fewest samples (selection included) any sequential test needs, in expectation, to
    certify this example at the largest grid radius the standard run certified.

    Wald's bound on the expected sample size of a test of p_r against p with error alpha
    at p_r and power 1 at p is log(1 / alpha) / KL(p || p_r) (Wald 1945); capped at n,
    since the standard run decides with n. Giving up a radius is counted as free and an
    uncertified example costs only its selection draws: a bound, not a design."""
    if standard_radius is None:
        return float(N0)
    largest = max(r for r in GRID if r <= standard_radius)
    threshold = 0.5 if largest == 0 else float(norm.cdf(largest / SIGMA))
    p = min(p_a, 1 - 1e-12)
    if p <= threshold:
        return float(N0 + N)
    divergence = p * np.log(p / threshold) + (1 - p) * np.log((1 - p) / (1 - threshold))
    return N0 + min(N, np.log(1 / ALPHA) / divergence)


def _summary(name: str, rows: list[tuple], labels: list[int], p_a: list[float],
             repetitions: int = 1) -> dict:
    samples = [r[4] for r in rows]
    bounds = [wald_bound(p, r[3] if r[2] == label else None)
              for p, r, label in zip(p_a, rows, labels, strict=True)]
    rows_array = np.array([r[:4] for r in rows], dtype=float)
    labels_array = np.array(labels)
    accuracy = {}
    for radius in GRID:
        sequential = (rows_array[:, 0] == labels_array) & (rows_array[:, 1] >= radius)
        standard = (rows_array[:, 2] == labels_array) & (rows_array[:, 3] >= radius)
        accuracy[str(radius)] = {"sequential": sequential.mean(), "standard": standard.mean()}
    return {
        "population": name, "examples": len(rows) // repetitions, "repetitions": repetitions,
        "grid": list(GRID), "sigma": SIGMA,
        "n0": N0, "n": N, "alpha": ALPHA,
        "samples_ratio": float(np.mean(samples)) / (N0 + N),
        "wald_bound_ratio": float(np.mean(bounds)) / (N0 + N),
        "certified_accuracy": accuracy,
    }


def fitted_p_as(path: Path, sigma: float = SIGMA) -> list[float]:
    """One p_A per row of a result file of Cohen et al.'s (n = 100,000): the p-hat its
    radius came from, 0.45 where it abstained."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [0.45 if int(row[2]) == -1 else p_a_from_radius(float(row[3]), sigma=sigma)
            for row in rows]


# Seeds of repetition k are index + k * REPETITION_STRIDE (repetition 0: the index itself).
REPETITION_STRIDE = 100_000


def _seeds(count: int, repetitions: int) -> list[tuple[int, int]]:
    """(example, seed) for every example of every repetition."""
    return [(index, index + k * REPETITION_STRIDE)
            for k in range(repetitions) for index in range(count)]


def cohen_population(repetitions: int = 1) -> dict | None:
    if not REFERENCE.is_file():
        return None
    p_as = fitted_p_as(REFERENCE)
    x = torch.zeros(1, 1, 16)  # two coordinates are read; 16 keeps the two runs paired
    pairs = _seeds(len(p_as), repetitions)
    rows = [_both_ways(Smooth(KnownProbability(p_as[i]), 3, SIGMA), x, seed)
            for i, seed in pairs]
    return _summary("cohen2019 imagenet sigma 0.50 (fitted p_A)", rows, [0] * len(rows),
                    [p_as[i] for i, _ in pairs], repetitions)


def digits_population(repetitions: int = 1) -> dict:
    from classifiers import build_classifier, build_dataset

    dataset = build_dataset("digits", split="test")
    model = build_classifier("digits-sigma0.50", class_names=dataset.classes, sigma=SIGMA)
    smooth = Smooth(model, len(dataset.classes), SIGMA)
    rows, labels = [], []
    for index, seed in _seeds(len(dataset), repetitions):
        x, label = dataset[index]
        rows.append(_both_ways(smooth, x, seed))
        labels.append(label)
    # p_A is unknown here: the estimate the standard run's radius came from
    p_hats = [p_a_from_radius(r[3], n=N) if r[2] >= 0 else 0.0 for r in rows]
    return _summary("digits test split, digits-sigma0.50", rows, labels, p_hats, repetitions)


def sequential_savings(repetitions: int = 1) -> list[dict]:
    return [r for r in (digits_population(repetitions), cohen_population(repetitions))
            if r is not None]


def print_sequential(records: list[dict]) -> None:
    for record in records:
        repetitions = record.get("repetitions", 1)
        pooled = f", {repetitions} repetitions pooled" if repetitions > 1 else ""
        print(f"sequential at radii {record['grid']}, n = {record['n']:,}: "
              f"{record['population']}{pooled}")
        print(f"  samples evaluated: {record['samples_ratio']:.3f} of CERTIFY's (target <= 0.2); "
              f"Wald's bound for any test: {record['wald_bound_ratio']:.3f}")
        digits = 1 if repetitions == 1 else 2
        cells = "  ".join(
            f"r={r}: {100 * a['sequential']:.{digits}f}/{100 * a['standard']:.{digits}f}"
            for r, a in record["certified_accuracy"].items()
        )
        print(f"  certified accuracy % (sequential/standard): {cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=1,
                        help="certify every example this many times both ways, on other "
                             "seeds (the figures pool them)")
    print_sequential(sequential_savings(parser.parse_args().repetitions))
