"""Diffusion denoised smoothing (Carlini et al. 2023): one step of an unconditional DDPM.

For noise sigma in [0, 1] space the image is mapped to [-1, 1] (noise 2 * sigma), the
timestep t with sqrt((1 - a_t) / a_t) >= 2 * sigma is found once (Eq. 6), the noisy image
is scaled to x_t = sqrt(a_t) * (2 x - 1), and one network call gives the clean estimate

    x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t) = x_hat - s_t * eps   (epsilon models)
    x0 = sqrt(a_t) * x_t - sqrt(1 - a_t) * v                           (v-prediction)

with s_t = sqrt((1 - a_t) / a_t), the schedule's noise level at t (>= 2 sigma by at most
one step of the grid). This is the `pred_xstart` of one reverse step, as both reference
implementations compute it; the result is clipped to [-1, 1] as their `clip_denoised`
does, then mapped back to [0, 1].

Checkpoint layout: a directory or hub repository holding either a `DDPMPipeline` (`unet/`
with a `UNet2DModel`, `scheduler/` with the scheduler config: what
`DDPMPipeline.save_pretrained` writes) or the UNet itself at its root (`config.json` and
`diffusion_pytorch_model.safetensors`, with `scheduler_config.json` beside them, as in
google/ddpm-cifar10-32). `variant="fp16"` reads `*.fp16.safetensors` weight files.
Learned-variance models (out_channels = 2 * in_channels, e.g. improved-diffusion ports)
keep only the noise channels.

Resolution: by default the image is denoised at its own size, as Carlini et al. feed
224 x 224 ImageNet crops to their 256 x 256 model: the UNet is convolutional, and
resampling the noisy image would filter the Gaussian noise (lower its variance and
correlate it), so the timestep of Eq. 6 would no longer match it. Sizes the UNet cannot
take (not a multiple of its downsampling factor) are reflect-padded and cropped back.
`resize=True` instead resizes to the UNet's `sample_size` (bilinear, antialiased) and
back, for models that only work at their training size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from denoisers.pipeline import Denoiser, pad_to_multiple
from denoisers.registry import dtype_kwargs, dtype_name, load_checkpoint, locate, parse_dtype
from denoisers.timesteps import noise_levels, timestep_for_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Where the UNet config and the scheduler config may sit: DDPMPipeline layout, then root.
UNET_CONFIGS = ("unet/config.json", "config.json")
SCHEDULER_CONFIGS = ("scheduler/scheduler_config.json", "scheduler_config.json")


class DDSDenoiser(Denoiser):
    """One-shot denoiser from an unconditional diffusers UNet2DModel and its schedule."""

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        sigma: float,
        *,
        resize: bool = False,
        checkpoint: str | None = None,
        variant: str | None = None,
    ):
        super().__init__(sigma)
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.resize = bool(resize)
        self.checkpoint = checkpoint
        self.variant = variant
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

        alphas_cumprod = scheduler.alphas_cumprod
        self.timestep = timestep_for_sigma(alphas_cumprod, 2 * self.sigma)
        alpha = float(torch.as_tensor(alphas_cumprod, dtype=torch.float64)[self.timestep])
        self.sqrt_alpha = math.sqrt(alpha)
        self.sqrt_one_minus_alpha = math.sqrt(1.0 - alpha)
        self.schedule_noise_level = float(noise_levels(alphas_cumprod)[self.timestep])
        self.register_buffer("_timestep", torch.tensor([self.timestep]), persistent=False)

        channels = int(unet.config.in_channels)
        out_channels = int(unet.config.out_channels)
        if out_channels not in (channels, 2 * channels):
            raise ValueError(
                f"UNet has {out_channels} output channels for {channels} input channels; "
                "expected the same number, or twice as many with a learned variance"
            )
        self.channels = channels
        self.learned_variance = out_channels == 2 * channels
        self.sample_size = _as_size(unet.config.sample_size)
        # The files the network was read from, for provenance hashes; None when unknown
        # (built in memory, or a hub id resolved by diffusers' cache).
        self.weight_files: list[Path] | None = None
        if self.resize and self.sample_size is None:
            raise ValueError("resize=True needs a UNet config with a sample_size")
        # Each down block but the last halves the resolution.
        self.size_multiple = 2 ** (len(unet.config.down_block_types) - 1)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        *,
        sigma: float,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        resize: bool = False,
        variant: str | None = None,
    ) -> DDSDenoiser:
        """Load the UNet and scheduler of a hub id or directory: a DDPMPipeline (`unet/`,
        `scheduler/`) or a UNet2DModel at the root with `scheduler_config.json` beside it.
        `variant` (e.g. "fp16") picks `*.VARIANT.safetensors` weight files."""
        torch_dtype = parse_dtype(dtype)

        def load(path: str) -> tuple[UNet2DModel, DDPMScheduler]:
            unet_folder = _folder(locate(path, UNET_CONFIGS))
            scheduler_folder = _folder(locate(path, SCHEDULER_CONFIGS))
            unet = UNet2DModel.from_pretrained(
                path,
                subfolder=unet_folder,
                use_safetensors=True,
                variant=variant,
                **dtype_kwargs(torch_dtype),
            )
            return unet, DDPMScheduler.from_pretrained(path, subfolder=scheduler_folder)

        unet, scheduler = load_checkpoint(
            load, checkpoint, what="diffusion model", variant=variant
        )
        folder = Path(checkpoint).expanduser()
        weight_files = _local_files(folder, variant) if folder.is_dir() else None
        if unet.dtype != torch_dtype:
            raise RuntimeError(f"asked diffusers for a {torch_dtype} UNet, got {unet.dtype}")
        denoiser = cls(
            unet, scheduler, sigma, resize=resize, checkpoint=str(checkpoint), variant=variant
        )
        denoiser.weight_files = weight_files
        return denoiser.to(device)

    def at(self, sigma: float) -> DDSDenoiser:
        """The same network for another noise level."""
        denoiser = DDSDenoiser(
            self.unet,
            self.scheduler,
            sigma,
            resize=self.resize,
            checkpoint=self.checkpoint,
            variant=self.variant,
        )
        denoiser.weight_files = self.weight_files
        return denoiser

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        if noisy.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {noisy.shape[1]}")
        x_hat = 2.0 * noisy.float() - 1.0  # [-1, 1] space: the noise is now 2 * sigma
        x_hat, restore = self._fit(x_hat)
        x_t = self.sqrt_alpha * x_hat
        dtype = self.unet.dtype
        out = self.unet(x_t.to(dtype), self._timestep.expand(x_t.shape[0]), return_dict=False)[0]
        prediction = out[:, : self.channels].float()  # drop learned-variance channels
        if self.prediction_type == "epsilon":
            x0 = x_hat - self.schedule_noise_level * prediction
        elif self.prediction_type == "v_prediction":
            x0 = self.sqrt_alpha * x_t - self.sqrt_one_minus_alpha * prediction
        else:
            x0 = prediction
        return ((restore(x0) + 1.0) / 2.0).clamp(0.0, 1.0)

    def _fit(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """x at a size the UNet takes, and the map of an output back to x's size."""
        height, width = x.shape[-2:]
        if self.resize and (height, width) != self.sample_size:
            resized = F.interpolate(
                x, size=self.sample_size, mode="bilinear", align_corners=False, antialias=True
            )

            def back(y: torch.Tensor) -> torch.Tensor:
                return F.interpolate(
                    y, size=(height, width), mode="bilinear", align_corners=False, antialias=True
                )

            return resized, back
        return pad_to_multiple(x, self.size_multiple)

    def settings(self) -> dict[str, Any]:
        return {
            "denoiser": "dds",
            "checkpoint": self.checkpoint,
            "variant": self.variant,
            "sigma": self.sigma,
            "model_noise_level": 2 * self.sigma,
            "timestep": self.timestep,
            "num_train_timesteps": self.num_train_timesteps,
            "schedule_noise_level": self.schedule_noise_level,
            "input_scale": self.sqrt_alpha,
            "prediction_type": self.prediction_type,
            "learned_variance": self.learned_variance,
            "resolution": "resize" if self.resize else "native",
            "sample_size": list(self.sample_size) if self.sample_size else None,
            "dtype": dtype_name(self.unet.dtype),
        }


def _local_files(folder: Path, variant: str | None) -> list[Path]:
    """The configs and the (possibly sharded) UNet weights a local checkpoint is read from."""
    unet_config = folder / locate(str(folder), UNET_CONFIGS)
    files = [unet_config, folder / locate(str(folder), SCHEDULER_CONFIGS)]
    return files + variant_weight_files(unet_config.parent, "diffusion_pytorch_model", variant)


def variant_weight_files(folder: Path, prefix: str, variant: str | None) -> list[Path]:
    """The safetensors files `from_pretrained(..., variant=variant)` reads in `folder`:
    PREFIX[.VARIANT].safetensors or its shards PREFIX[.VARIANT]-0000i-of-0000n.safetensors."""
    suffix = ".safetensors"
    marker = f".{variant}" if variant else ""
    files = []
    for path in sorted(folder.glob(f"{prefix}*{suffix}")):
        rest = path.name[len(prefix) : -len(suffix)]
        if rest == marker or rest.startswith(marker + "-"):
            files.append(path)
    return files


def _folder(config_path: str) -> str | None:
    """The subfolder holding a config file ("unet/config.json" -> "unet"), None at the root."""
    folder = Path(config_path).parent.as_posix()
    return None if folder == "." else folder


def _as_size(sample_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if sample_size is None:
        return None
    if isinstance(sample_size, int):
        return (sample_size, sample_size)
    height, width = sample_size
    return (int(height), int(width))
