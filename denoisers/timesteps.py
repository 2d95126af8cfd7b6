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


TIMESTEP_ROUNDINGS = ("floor", "reference")


def corrected_timestep(
    t: int, k: float, num_train_timesteps: int, rounding: str = "floor"
) -> int | float:
    """Timestep correction t' = k * t (Eq. 8) as the UNet's condition level.

    `rounding="floor"` (the default) rounds down and clamps to the last timestep T - 1:
    an integer in the range IF-II was trained on. The product is first rounded to 6
    decimals so that float error (e.g. 1.8 * 500 = 899.999...) cannot drop it by one.
    T - 1 is the largest timestep the scheduler has (diffusers' IF-II pipeline rejects
    noise_level >= T).

    `rounding="reference"` is what Choi et al.'s code (`robustify-T2I`, IF_robust_model.py)
    feeds IF-II: the unrounded float k * t, set to T where it exceeds T. The UNet's
    sinusoidal class embedding takes a float level, so 520.2 (sigma = 0.25) and 520 give
    different embeddings, as do 1000 and 999 at sigma = 1.0.

    k = 0 gives t' = 0 in both modes (the condition is treated as noiseless).
    """
    if not k >= 0 or not math.isfinite(k):
        raise ValueError(f"correction factor k must be >= 0, got {k}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"timestep {t} is outside [0, {num_train_timesteps})")
    if rounding == "floor":
        return min(math.floor(round(k * t, 6)), num_train_timesteps - 1)
    if rounding == "reference":
        return float(min(k * t, num_train_timesteps))
    raise ValueError(
        f"unknown timestep rounding {rounding!r}; use {' or '.join(TIMESTEP_ROUNDINGS)}"
    )
