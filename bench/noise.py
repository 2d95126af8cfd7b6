"""What the Gaussian-tailed sampler costs (`smoothing.noise.gaussian_noise`, float64 draws).

Against the engine's former draw, torch's float32 `normal_` (capped at 5.77 sigma on the
CPU; see docs/verification.md, "The noise"), interleaved in one process:

- the draw alone, for a batch of digits inputs (1000 x 1x8x8) and of ImageNet-sized ones
  (50 x 3x224x224);
- `Smooth.certify` of the digits CNN (n0 = 100, n = 10^4, batch 1000) with each sampler,
  where the draw is the largest share of the engine's time (the CNN costs ~6 us a sample).

    python -m bench.noise [--repeats 5]

`make bench` runs it as part of `bench.run` and writes the figures under "noise_sampler".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from unittest import mock

import torch

import smoothing.core
from classifiers import build_classifier
from smoothing.core import Smooth
from smoothing.noise import gaussian_noise

DRAW_SHAPES = ((1000, 1, 8, 8), (50, 3, 224, 224))


def float32_normal(
    shape: Sequence[int],
    sigma: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The engine's draw before `gaussian_noise`: torch's `normal_` in the input's dtype."""
    device = generator.device if device is None else device
    noise = torch.empty(tuple(shape), dtype=dtype, device=device)
    return noise.normal_(0.0, sigma, generator=generator)


def noise_cost(repeats: int = 5) -> dict:
    """Median times of both samplers, alone and inside the digits CNN's certify."""
    from bench.run import N0, N, interleaved_medians  # here: bench.run imports this module

    draws = []
    for shape in DRAW_SHAPES:
        generator = torch.Generator().manual_seed(0)
        new, old = interleaved_medians(
            [lambda shape=shape, generator=generator: gaussian_noise(shape, 0.25, generator),
             lambda shape=shape, generator=generator: float32_normal(shape, 0.25, generator)],
            repeats,
        )
        draws.append({
            "shape": list(shape), "float64_ms": round(1000 * new, 3),
            "float32_ms": round(1000 * old, 3), "ratio": round(new / old, 3),
        })

    digits = build_classifier("digits", class_names=[str(i) for i in range(10)], sigma=0.25)
    smooth = Smooth(digits.eval(), 10, 0.25)
    x = torch.rand((1, 8, 8), generator=torch.Generator().manual_seed(0))

    def certify() -> None:
        smooth.certify(x, N0, N, 0.001, 1000, torch.Generator().manual_seed(1))

    def certify_float32() -> None:
        with mock.patch.object(smoothing.core, "gaussian_noise", float32_normal):
            certify()

    new, old = interleaved_medians([certify, certify_float32], repeats)
    record = {
        "draws": draws,
        "certify_digits_cnn": {
            "n0": N0, "n": N, "batch": 1000, "float64_s": round(new, 4),
            "float32_s": round(old, 4), "ratio": round(new / old, 3),
        },
    }
    print(f"{'noise draw':<18} {'float64 (ms)':>13} {'float32 (ms)':>13} {'ratio':>6}")
    for row in draws:
        shape = "x".join(map(str, row["shape"]))
        print(f"{shape:<18} {row['float64_ms']:>13.2f} {row['float32_ms']:>13.2f} "
              f"{row['ratio']:>6.2f}")
    row = record["certify_digits_cnn"]
    print(f"{'certify digits CNN':<18} {1000 * row['float64_s']:>13.1f} "
          f"{1000 * row['float32_s']:>13.1f} {row['ratio']:>6.2f}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(noise_cost(args.repeats), indent=2))


if __name__ == "__main__":
    main()
