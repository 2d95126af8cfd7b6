"""The smoothing noise: sigma * z with z ~ N(0, I), drawn so that its tails are Gaussian.

torch's float32 `normal_` is Box-Muller on 24-bit uniforms on the CPU (32-bit ones on
CUDA): no coordinate ever exceeds 5.77 sigma (6.76 on CUDA). For a 3x224x224 input the
Gaussian puts about 4.5e-3 of its mass where that sampler never goes, more than the
alpha = 0.001 a certificate is stated at, so a classifier that looks at large noise
coordinates is certified under another distribution than N(0, sigma^2 I).

`gaussian_noise` draws with torch's float64 `normal_` instead (Box-Muller on 53-bit
uniforms on the CPU and on CUDA), multiplies by sigma in float64 and only then rounds to
the input's dtype. Its largest |z| is 8.57 on the CPU (8.65 on CUDA); the Gaussian mass it
cannot reach is at most d * 2^-53 for d coordinates (1.7e-11 for 3x224x224). See
docs/verification.md, "The noise", for the derivation and what it does not cover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Recorded in the settings of every result: rows drawn by another sampler are not the same
# run, so a resume across samplers is refused.
NOISE_SAMPLER = "float64 normal_ (Box-Muller, 53-bit uniforms), times sigma, rounded to dtype"

# Elements drawn per float64 temporary, so that the temporary stays small (64 MiB, at most
# twice that for the last piece) whatever the batch. A multiple of 16: torch's CPU kernel
# pairs elements within blocks of 16 from the start of each call, so pieces of this size
# give exactly the draws of one call over the whole tensor (the last piece, >= this size,
# absorbs the remainder, so no piece is short enough to take torch's other small-tensor path).
_CHUNK_ELEMENTS = 2**23


def gaussian_noise(
    shape: Sequence[int],
    sigma: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A tensor of `shape` holding sigma * z, z ~ N(0, I), drawn in float64 from `generator`.

    The draw depends only on the generator's state, the shape and the device type (CPU and
    CUDA generators differ); on the CPU it is exactly
    `torch.empty(shape, dtype=torch.float64).normal_(0, sigma, generator=generator)` rounded
    to `dtype`. `device` defaults to the generator's.
    """
    if isinstance(sigma, bool) or not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    if not dtype.is_floating_point:
        raise ValueError(f"noise needs a floating-point dtype, got {dtype}")
    device = generator.device if device is None else torch.device(device)
    noise = torch.empty(tuple(shape), dtype=dtype, device=device)
    flat = noise.view(-1)
    total = flat.numel()
    pieces = max(1, total // _CHUNK_ELEMENTS)
    for piece in range(pieces):
        start = piece * _CHUNK_ELEMENTS
        stop = total if piece == pieces - 1 else start + _CHUNK_ELEMENTS
        if dtype == torch.float64:
            flat[start:stop].normal_(0.0, sigma, generator=generator)
        else:
            draw = torch.empty(stop - start, dtype=torch.float64, device=device)
            flat[start:stop].copy_(draw.normal_(0.0, sigma, generator=generator))
    return noise
