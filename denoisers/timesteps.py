"""Diffusion timesteps for a Gaussian noise level (Choi et al. 2024, Eq. 6 and Eq. 8).

A noisy image x_hat = x + N(0, s^2 I) scaled by sqrt(alpha_t) looks like the diffusion
state x_t = sqrt(alpha_t) x + sqrt(1 - alpha_t) eps when s^2 = (1 - alpha_t) / alpha_t
(Eq. 6, Carlini et al. 2023). `alpha_t` is the cumulative product `alphas_cumprod[t]`
of a diffusers scheduler, indexed 0..T-1 as diffusers and guided-diffusion both do.

Models trained on [-1, 1] images see twice the noise of the [0, 1] space the engine adds
it in: the caller passes s = 2 * sigma (paper, Appendix A.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def noise_levels(alphas_cumprod: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """sqrt((1 - alpha_t) / alpha_t) for every t, in float64 (increasing in t)."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if a.numel() == 0 or not bool(((a > 0) & (a <= 1)).all()):
        raise ValueError("alphas_cumprod must be a non-empty sequence of values in (0, 1]")
    return ((1.0 - a) / a).sqrt()


def timestep_for_sigma(alphas_cumprod: torch.Tensor | Sequence[float], sigma: float) -> int:
    """The first timestep whose noise level sqrt((1 - a_t) / a_t) reaches `sigma` (Eq. 6).

    `sigma` is the noise level in the model's own image space: for [-1, 1] models the
    caller has already doubled the [0, 1]-space sigma.

    Convention: the smallest t with level(t) >= sigma, so level(t - 1) < sigma <=
    level(t). This is what both reference implementations compute (Carlini et al.'s
    `diffusion_denoised_smoothing` and Choi et al.'s `robustify-T2I` step t upwards while
    the level is below the target), except that their loop starts at t = 1: they never
    return t = 0, which differs from this function only when sigma <= level(0)
    (about 0.006 for IF-II's schedule), far below any smoothing noise in use.
    """
    sigma = float(sigma)
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    levels = noise_levels(alphas_cumprod)
    # levels increase with t: searchsorted(left) is the first index with level >= sigma.
    t = int(torch.searchsorted(levels, torch.tensor([sigma], dtype=torch.float64))[0])
    if t >= levels.numel():
        raise ValueError(
            f"noise level {sigma} exceeds the schedule's largest, {float(levels[-1]):.4g} "
            f"at t={levels.numel() - 1}"
        )
    return t


def corrected_timestep(t: int, k: float, num_train_timesteps: int) -> int:
    """Timestep correction t' = k * t (Eq. 8), rounded down and clamped to the last timestep.

    Rounding: floor, as `int(t * k)` in the reference code's timestep search; the
    product is first rounded to 6 decimals so that float error (e.g. 1.8 * 500 =
    899.999...) cannot drop it by one. Clamp: to T - 1, the largest timestep the
    scheduler has (diffusers' IF-II pipeline rejects noise_level >= T). The reference
    code instead feeds the unrounded float k * t and clamps it at T; the two differ by
    less than one step in the sinusoidal class embedding, e.g. 520 vs 520.2 at
    sigma = 0.25 and 999 vs 1000 at sigma = 1.0.
    """
    if not k >= 0 or not math.isfinite(k):
        raise ValueError(f"correction factor k must be >= 0, got {k}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"timestep {t} is outside [0, {num_train_timesteps})")
    return min(math.floor(round(k * t, 6)), num_train_timesteps - 1)
