"""The shipped digits DDPM (denoisers/weights/digits_ddpm) and its training script.

- The weights load offline through the standard diffusers entry points.
- Eq. 6 timestep search on the cosine schedule gives the known timesteps.
- One-shot denoising at sigma 0.5 brings test images much closer to the clean ones.
- Training is deterministic in its seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from classifiers.digits import load_digits_split
from denoisers import BUNDLED_DIGITS_DDPM, DENOISERS, timestep_for_sigma
from denoisers.train_digits_ddpm import DEFAULT_OUT, build_scheduler, train
from tests.tiny_models import go_offline

WEIGHTS = DEFAULT_OUT


@pytest.fixture
def offline(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path / "hub-cache")


def test_shipped_pipeline_loads_offline(offline):
    pipe = DDPMPipeline.from_pretrained(WEIGHTS)
    assert isinstance(pipe.unet, UNet2DModel)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    unet = UNet2DModel.from_pretrained(WEIGHTS, subfolder="unet")
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (8, 1, 1)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert (WEIGHTS / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # both entry points read the same weights
    x = torch.zeros(2, 1, 8, 8)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t).sample, unet(x, t).sample)


def test_timestep_search_known_values():
    # DESIGN.md: on the 1000-step cosine schedule (DeepFloyd IF's) the first timestep
    # whose noise level reaches 2*sigma is 289, 496, 702 for sigma 0.25, 0.5, 1.0.
    a = build_scheduler().alphas_cumprod
    assert [timestep_for_sigma(a, 2 * s) for s in (0.25, 0.5, 1.0)] == [289, 496, 702]
    # and it is the *first* such t: one step earlier is below the level
    for sigma in (0.1, 0.37, 0.8):
        t = timestep_for_sigma(a, 2 * sigma)
        level = lambda i: math.sqrt((1 - float(a[i])) / float(a[i]))  # noqa: E731
        assert level(t) >= 2 * sigma > level(t - 1)


def test_shipped_scheduler_is_the_cosine_schedule(offline):
    shipped = DDPMScheduler.from_pretrained(WEIGHTS, subfolder="scheduler")
    assert torch.allclose(shipped.alphas_cumprod, build_scheduler().alphas_cumprod)


def test_one_step_denoising_reduces_mse_at_sigma_half(offline):
    assert BUNDLED_DIGITS_DDPM == WEIGHTS
    sigma = 0.5
    denoiser = DENOISERS.build("dds", sigma=sigma, checkpoint=BUNDLED_DIGITS_DDPM).eval()
    assert denoiser.timestep == 496
    clean = load_digits_split("test").images
    gen = torch.Generator().manual_seed(1234)
    noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
    with torch.no_grad():
        denoised = denoiser.denoise(noisy)
    assert denoised.shape == clean.shape
    assert denoised.min() >= 0 and denoised.max() <= 1
    mse_noisy = (noisy - clean).pow(2).mean()  # about sigma^2 = 0.25
    mse_clipped = (noisy.clamp(0, 1) - clean).pow(2).mean()  # the trivial "denoiser"
    mse_denoised = (denoised - clean).pow(2).mean()
    assert mse_denoised < mse_noisy / 4
    assert mse_denoised < mse_clipped / 2


def _weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_training_is_deterministic_in_its_seed(tmp_path):
    settings = dict(
        steps=3,
        batch_size=8,
        lr=1e-3,
        warmup_steps=1,
        ema_decay=0.999,
        block_out_channels=(16, 32),
        layers_per_block=1,
        threads=None,
    )
    first = train(tmp_path / "a", seed=0, **settings)
    train(tmp_path / "b", seed=0, **settings)
    train(tmp_path / "c", seed=1, **settings)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert first["steps"] == 3 and math.isfinite(first["final_loss_mean_last_100_steps"])
