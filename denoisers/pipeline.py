"""The denoiser interface and the denoise-and-classify base classifier (Eq. 4).

Denoised smoothing (Salman et al. 2020; Carlini et al. 2023; Choi et al. 2024) smooths
f(x) = classifier(denoise(x)): the noise the engine adds to a [0, 1] image is removed
before an off-the-shelf classifier sees it. `DenoiseAndClassify` is that f, a plain
base classifier for `smoothing.Smooth`.

GPU memory: the engine's batch (`--batch`, the noise draws per step) can hold far more
images than a 1.2B-parameter UNet can denoise at once, so `DenoiseAndClassify` splits it
into micro-batches. Each image is denoised and classified on its own (no op mixes images
of a batch), so the logits do not depend on the micro-batch beyond float rounding of
batch-size-dependent kernels. On a CUDA out-of-memory error the micro-batch is halved,
with a warning, and the chunk is retried. `default_micro_batch` sizes the first one from
a per-image estimate (docs/benchmarks.md says how it was made).
"""

from __future__ import annotations

import math
import warnings
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

    `micro_batch`: at most this many images go through the denoiser and the classifier
    at once; None chooses one per call with `default_micro_batch` (the whole batch on a
    CPU). A CUDA out-of-memory error halves it (down to 1) and retries; the halved size
    is kept for later calls, in `micro_batch`.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        classifier: nn.Module,
        sigma: float | None = None,
        micro_batch: int | None = None,
    ):
        super().__init__()
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
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
        self.micro_batch = micro_batch

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        total = noisy.shape[0]
        if total == 0:  # as unsplit: whatever the networks make of an empty batch
            return self.classifier(self.denoiser(noisy, self.sigma))
        size = self.micro_batch or default_micro_batch(self.denoiser, noisy)
        logits, start = [], 0
        while start < total:
            chunk = noisy[start : start + size]
            try:
                logits.append(self.classifier(self.denoiser(chunk, self.sigma)))
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                out_of_memory = True
            else:
                out_of_memory = False
            if out_of_memory:  # outside the except block: its traceback no longer pins memory
                size = self._halve(min(size, chunk.shape[0]))
                continue
            start += chunk.shape[0]
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _halve(self, size: int) -> int:
        halved = max(1, size // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand cached blocks back before the smaller retry
        warnings.warn(
            f"CUDA out of memory denoising {size} images at once; micro-batch is now "
            f"{halved} (results do not depend on it)",
            RuntimeWarning,
            stacklevel=3,
        )
        self.micro_batch = halved
        return halved


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


# Bytes of live tensors per image in DenoiseAndClassify(IF-II-L, CLIP ViT-B/32) at
# 224 x 224, forward without gradients, by the element size of the UNet's weights
# (fp16/bf16: 2, fp32: 4; CLIP kept in fp32). An ESTIMATE, not a GPU measurement:
# `python -m bench.gpu_memory` runs this module's forward on the public IF-II-L and
# ViT-B/32 architectures with random weights on the meta device and counts the bytes of
# live tensors op by op (docs/benchmarks.md). It leaves out cuDNN workspaces and the
# caching allocator's fragmentation, hence FREE_MEMORY_SHARE below.
IF2_L_CLIP_B32_BYTES_PER_IMAGE_224 = {2: 227_100_992, 4: 452_997_760}
# Of the free memory, the share given to micro-batches: the rest is left for cuDNN
# workspaces, fragmentation and the engine's own noise batch.
FREE_MEMORY_SHARE = 0.8


def default_micro_batch(denoiser: nn.Module, noisy: torch.Tensor) -> int:
    """The micro-batch `DenoiseAndClassify` starts with when none is given.

    On a CPU the whole batch (memory is the host's, and one big batch is fastest). On
    CUDA, `micro_batch_that_fits` the device's free memory (counting what the caching
    allocator holds unused), for the element size of the denoiser's weights (2 bytes for
    fp16/bf16, also under autocast; 4 for fp32).
    """
    batch = int(noisy.shape[0])
    if not noisy.is_cuda:
        return max(1, batch)
    parameter = next(denoiser.parameters(), None)
    element_size = 4 if parameter is None else min(4, max(2, parameter.element_size()))
    if torch.is_autocast_enabled("cuda"):
        element_size = 2
    free, _ = torch.cuda.mem_get_info(noisy.device)
    # memory PyTorch's allocator holds but does not use (earlier chunks' activations) is
    # free for this call too; without it the default would shrink after the first call
    free += torch.cuda.memory_reserved(noisy.device) - torch.cuda.memory_allocated(noisy.device)
    return micro_batch_that_fits(
        free, height=int(noisy.shape[-2]), width=int(noisy.shape[-1]),
        element_size=element_size, batch=batch,
    )


def micro_batch_that_fits(
    free_bytes: int, *, height: int, width: int, element_size: int, batch: int
) -> int:
    """How many images of IF-II-L + CLIP ViT-B/32 fit `FREE_MEMORY_SHARE` of `free_bytes`.

    The per-image estimate at 224 x 224 is scaled by the pixel count (the UNet's
    activations are convolutional feature maps; its attention runs at 1/8 and 1/16 of
    the side). A denoiser smaller than IF-II-L gets a smaller micro-batch than it could
    take, which costs speed only; a larger one is caught by the out-of-memory halving.
    Between 1 and `batch`.
    """
    if element_size not in IF2_L_CLIP_B32_BYTES_PER_IMAGE_224:
        raise ValueError(f"element_size must be 2 or 4 bytes, got {element_size}")
    per_image = IF2_L_CLIP_B32_BYTES_PER_IMAGE_224[element_size] * height * width / 224**2
    return max(1, min(batch, int(FREE_MEMORY_SHARE * free_bytes // per_image)))
