"""Tiny consistency models of the real classes, for the CMAP tests (offline).

`save_tiny_cm(dir, ...)` builds a randomly initialised diffusers `UNet2DModel` with a
`CMStochasticIterativeScheduler`, saves them as a `ConsistencyModelPipeline`
(`unet/`, `scheduler/`, safetensors) and returns the directory, so tests load it back
through `ConsistencyFunction.from_pretrained`, the path a hub id such as
openai/diffusers-cd_imagenet64_l2 takes. Seeds are fixed: the same call, the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_cm_unet(
    *, channels: int = 1, sample_size: int = 8, num_class_embeds: int | None = None,
    seed: int = 0,
):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )


def tiny_cm_scheduler(*, sigma_max: float = 80.0):
    from diffusers import CMStochasticIterativeScheduler

    # openai/diffusers-cd_imagenet64_l2's scheduler settings (EDM's noise range)
    return CMStochasticIterativeScheduler(
        num_train_timesteps=40, sigma_min=0.002, sigma_max=sigma_max, sigma_data=0.5,
        rho=7.0, clip_denoised=True,
    )


def save_tiny_cm(
    directory: str | Path,
    *,
    channels: int = 1,
    sample_size: int = 8,
    num_class_embeds: int | None = None,
    seed: int = 0,
    sigma_max: float = 80.0,
) -> Path:
    """Save a tiny consistency model into `directory` (ConsistencyModelPipeline layout)."""
    from diffusers import ConsistencyModelPipeline

    directory = Path(directory)
    unet = tiny_cm_unet(
        channels=channels, sample_size=sample_size, num_class_embeds=num_class_embeds, seed=seed
    )
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=tiny_cm_scheduler(sigma_max=sigma_max))
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
