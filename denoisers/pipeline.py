"""The denoiser interface and the denoise-and-classify base classifier (Eq. 4).

Denoised smoothing (Salman et al. 2020; Carlini et al. 2023; Choi et al. 2024) smooths
f(x) = classifier(denoise(x)): the noise the engine adds to a [0, 1] image is removed
before an off-the-shelf classifier sees it. `DenoiseAndClassify` is that f, a plain
base classifier for `smoothing.Smooth`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Denoiser(nn.Module):
    """A denoiser built for one noise level.

    Called as `denoiser(noisy, sigma)` with `noisy` = x + N(0, sigma^2) for x in [0, 1],
    shape [B, C, H, W]; returns a clean estimate in [0, 1] of the same shape, in float32.
    Everything that depends only on sigma (timesteps, scalings, text embeddings) is
    computed at construction, so `sigma` must be the construction sigma. Subclasses
    implement `denoise` and `settings`.
    """

    def __init__(self, sigma: float):
        super().__init__()
        sigma = float(sigma)
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a positive finite number, got {sigma}")
        self.sigma = sigma

    def check_sigma(self, sigma: float) -> None:
        """Raise ValueError unless `sigma` is the noise level this denoiser was built for."""
        if not math.isclose(float(sigma), self.sigma, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(
                f"{type(self).__name__} was built for sigma={self.sigma}, called with "
                f"sigma={float(sigma)}; build a new denoiser for a new noise level"
            )

    def forward(self, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
        self.check_sigma(sigma)
        if noisy.dim() != 4:
            raise ValueError(f"expected a [B, C, H, W] batch, got shape {tuple(noisy.shape)}")
        return self.denoise(noisy)

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        """Denoise a [B, C, H, W] batch in [0, 1] space (noise level: `self.sigma`)."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Every setting of this denoiser, JSON-serializable, for the result-file sidecar."""
        raise NotImplementedError


class DenoiseAndClassify(nn.Module):
    """The base classifier f(x) = classifier(denoiser(x, sigma)) of denoised smoothing.

    `sigma` defaults to the one the denoiser was built for; a different one is an error.
    Maps [B, C, H, W] in [0, 1] (already noisy) to the classifier's logits [B, K].
    Nothing here stops gradients: attacks and the classifier-guided fine-tuning of
    `adapt` differentiate through the whole pipeline (paper, Appendix A).
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, sigma: float | None = None):
        super().__init__()
        built_for = getattr(denoiser, "sigma", None)
        if sigma is None:
            if built_for is None:
                raise ValueError("give sigma: the denoiser does not say which it was built for")
            sigma = built_for
        sigma = float(sigma)
        if built_for is not None and not math.isclose(float(built_for), sigma, rel_tol=1e-9):
            raise ValueError(
                f"the denoiser was built for sigma={float(built_for)}, "
                f"the smoothing noise is sigma={sigma}"
            )
        self.denoiser = denoiser
        self.classifier = classifier
        self.sigma = sigma

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(noisy, self.sigma))


def pad_to_multiple(
    x: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Reflect-pad H and W of x up to a multiple of `multiple`; return it and the crop back.

    For UNets that need sizes divisible by their downsampling factor. Padding, unlike
    resampling, leaves the noise of the original pixels as it is (i.i.d. at the level
    the timestep was chosen for).
    """
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return x, lambda y: y
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    return padded, lambda y: y[..., :height, :width]
