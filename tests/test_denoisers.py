"""Timesteps (Eq. 6, Eq. 8), the DDS denoiser, DenoiseAndClassify and the registry.

Offline: tiny diffusers models are saved with save_pretrained into a temp folder and
loaded back through the same builder a user calls with a hub id.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from classifiers.registry import Registry, UnknownNameError
from denoisers import (
    DENOISERS,
    CheckpointNotFoundError,
    DenoiseAndClassify,
    corrected_timestep,
    timestep_for_sigma,
)
from tests.tiny_models import go_offline, save_tiny_ddpm

SIGMA = 0.25


def levels_of(scheduler: DDPMScheduler) -> np.ndarray:
    """The schedule's noise levels sqrt((1 - a_t) / a_t), computed here in numpy."""
    a = scheduler.alphas_cumprod.double().numpy()
    return np.sqrt((1.0 - a) / a)


# ---------------------------------------------------------------- timesteps


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_timestep_is_first_whose_noise_level_reaches_sigma(schedule):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    levels = levels_of(scheduler)
    rng = np.random.default_rng(0)
    sigmas = np.exp(rng.uniform(np.log(levels[1]), np.log(levels[-1]), size=300))
    for sigma in sigmas:
        t = timestep_for_sigma(scheduler.alphas_cumprod, float(sigma))
        assert levels[t] >= sigma, (sigma, t)
        assert levels[t - 1] < sigma, (sigma, t)
    # Just below / above a grid level: that timestep / the next one.
    for t in range(1, 999, 37):
        assert timestep_for_sigma(scheduler.alphas_cumprod, levels[t] * (1 - 1e-9)) == t
        assert timestep_for_sigma(scheduler.alphas_cumprod, levels[t] * (1 + 1e-9)) == t + 1


def test_timestep_for_if2_schedule_matches_known_values():
    # DESIGN.md: IF-II's schedule at sigma 0.25, 0.5, 1.0 (doubled for [-1, 1]).
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    found = [timestep_for_sigma(scheduler.alphas_cumprod, 2 * s) for s in (0.25, 0.5, 1.0)]
    assert found == [289, 496, 702]


def test_timestep_rejects_levels_outside_the_schedule():
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    with pytest.raises(ValueError, match="exceeds"):
        timestep_for_sigma(alphas, 1e6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            timestep_for_sigma(alphas, bad)


def test_corrected_timestep_rounds_down_and_clamps():
    assert corrected_timestep(289, 1.8, 1000) == 520  # 520.2
    assert corrected_timestep(496, 1.8, 1000) == 892  # 892.8
    assert corrected_timestep(702, 1.8, 1000) == 999  # 1263.6 -> last timestep
    assert corrected_timestep(300, 1.0, 1000) == 300
    assert corrected_timestep(300, 0.0, 1000) == 0
    assert corrected_timestep(100, 0.29, 1000) == 29  # 0.29 * 100 = 28.999999999999996
    assert corrected_timestep(999, 1.8, 1000) == 999
    with pytest.raises(ValueError):
        corrected_timestep(10, -1.0, 1000)
    with pytest.raises(ValueError):
        corrected_timestep(1000, 1.0, 1000)


# ---------------------------------------------------------------- DDS


@pytest.fixture(scope="module")
def ddpm_dirs(tmp_path_factory):
    """Tiny DDPM checkpoints, built on first use per (prediction_type, channels)."""
    cache = {}

    def get(prediction_type="epsilon", channels=3):
        key = (prediction_type, channels)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"ddpm_{prediction_type}_{channels}")
            cache[key] = save_tiny_ddpm(
                root, prediction_type=prediction_type, prediction_channels=channels
            )
        return cache[key]

    return get


@pytest.fixture(scope="module")
def dds(ddpm_dirs):
    return DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(ddpm_dirs()))


def clean_and_noisy(shape, sigma=SIGMA, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.8 * torch.rand(shape, generator=g)  # away from the clamp at 0 and 1
    return x, x + sigma * torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    ("prediction_type", "channels"),
    [("epsilon", 3), ("epsilon", 6), ("v_prediction", 3), ("v_prediction", 6), ("sample", 3)],
)
def test_dds_recovers_the_clean_image_when_the_model_is_exact(
    ddpm_dirs, prediction_type, channels, monkeypatch
):
    checkpoint = ddpm_dirs(prediction_type, channels)
    denoiser = DENOISERS.build("dds", sigma=SIGMA, checkpoint=checkpoint)
    scheduler = DDPMScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    # Expected timestep and scaling, from the scheduler's own schedule.
    t = int(np.argmax(levels_of(scheduler) >= 2 * SIGMA))
    alpha = float(scheduler.alphas_cumprod[t])

    x, noisy = clean_and_noisy((2, 3, 16, 16))
    x_model = 2 * x - 1
    calls = []

    def exact_model(sample, timestep, *args, return_dict=True, **kwargs):
        # The true target of the forward process x_t = sqrt(a) x0 + sqrt(1 - a) eps.
        calls.append((sample.clone(), timestep.clone()))
        eps = (sample - math.sqrt(alpha) * x_model) / math.sqrt(1 - alpha)
        if prediction_type == "epsilon":
            target = eps
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(x_model, eps, torch.full((2,), t))
        else:
            target = x_model
        if channels == 6:  # a learned variance the denoiser must ignore
            target = torch.cat([target, torch.full_like(target, 100.0)], dim=1)
        return (target,)

    monkeypatch.setattr(denoiser.unet, "forward", exact_model)
    out = denoiser(noisy, SIGMA)

    assert len(calls) == 1
    sample, timestep = calls[0]
    torch.testing.assert_close(timestep, torch.full((2,), t))
    torch.testing.assert_close(sample, math.sqrt(alpha) * (2 * noisy - 1))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    assert denoiser.settings()["timestep"] == t


def test_dds_output_is_an_image_of_the_input_size(dds):
    _, noisy = clean_and_noisy((3, 3, 16, 16))
    with torch.no_grad():
        out = dds(noisy, SIGMA)
    assert out.shape == noisy.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, noisy.clamp(0, 1))  # the network did something


def shapes_seen_by_unet(denoiser, noisy, monkeypatch):
    seen = []
    original = denoiser.unet.forward

    def spy(sample, *args, **kwargs):
        seen.append(tuple(sample.shape))
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(denoiser.unet, "forward", spy)
    with torch.no_grad():
        out = denoiser(noisy, SIGMA)
    return seen, out


def test_dds_native_resolution_pads_odd_sizes_and_crops_back(dds, monkeypatch):
    _, noisy = clean_and_noisy((2, 3, 15, 13))
    seen, out = shapes_seen_by_unet(dds, noisy, monkeypatch)
    assert seen == [(2, 3, 16, 14)]  # next multiples of the UNet's downsampling factor 2
    assert out.shape == noisy.shape
    _, noisy = clean_and_noisy((2, 3, 12, 12))
    seen, _ = shapes_seen_by_unet(dds, noisy, monkeypatch)
    assert seen == [(2, 3, 12, 12)]  # a size the UNet takes is used as is


def test_dds_resize_option_runs_at_the_sample_size(ddpm_dirs, monkeypatch):
    denoiser = DENOISERS.build("dds", sigma=SIGMA, checkpoint=ddpm_dirs(), resize=True)
    _, noisy = clean_and_noisy((2, 3, 12, 12))
    seen, out = shapes_seen_by_unet(denoiser, noisy, monkeypatch)
    assert seen == [(2, 3, 16, 16)]
    assert out.shape == noisy.shape
    assert denoiser.settings()["resolution"] == "resize"


def test_dds_bf16_runs_the_unet_in_bf16_and_returns_fp32(ddpm_dirs, dds, monkeypatch):
    denoiser = DENOISERS.build("dds", sigma=SIGMA, checkpoint=ddpm_dirs(), dtype="bf16")
    assert next(denoiser.unet.parameters()).dtype == torch.bfloat16
    _, noisy = clean_and_noisy((2, 3, 16, 16))
    dtypes = []
    original = denoiser.unet.forward

    def spy(sample, *args, **kwargs):
        dtypes.append(sample.dtype)
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(denoiser.unet, "forward", spy)
    with torch.no_grad():
        out, reference = denoiser(noisy, SIGMA), dds(noisy, SIGMA)
    assert dtypes == [torch.bfloat16]
    assert out.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: the same weights give the same image to about 1e-2.
    assert (out - reference).abs().mean() < 1e-2
    assert denoiser.settings()["dtype"] == "bf16"


def test_dds_settings_are_json_and_complete(dds, ddpm_dirs):
    settings = json.loads(json.dumps(dds.settings()))
    assert settings["denoiser"] == "dds"
    assert settings["checkpoint"] == str(ddpm_dirs())
    assert settings["sigma"] == SIGMA
    assert settings["model_noise_level"] == 2 * SIGMA
    assert settings["prediction_type"] == "epsilon"
    assert settings["dtype"] == "fp32"
    assert settings["resolution"] == "native"
    assert settings["schedule_noise_level"] >= 2 * SIGMA


# ---------------------------------------------------------------- sigma, pipeline


def test_denoiser_rejects_another_sigma(dds):
    _, noisy = clean_and_noisy((1, 3, 16, 16))
    with pytest.raises(ValueError, match="sigma"):
        dds(noisy, 0.5)
    with pytest.raises(ValueError, match="sigma"):
        DenoiseAndClassify(dds, torch.nn.Identity(), sigma=0.5)
    assert DenoiseAndClassify(dds, torch.nn.Identity()).sigma == SIGMA


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3 * 16 * 16, 4)

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_denoise_and_classify_composes_and_is_differentiable(dds):
    classifier = TinyClassifier()
    model = DenoiseAndClassify(dds, classifier, SIGMA)
    _, noisy = clean_and_noisy((2, 3, 16, 16))
    noisy.requires_grad_(True)
    logits = model(noisy)
    assert logits.shape == (2, 4)
    with torch.no_grad():
        torch.testing.assert_close(logits, classifier(dds(noisy, SIGMA)))
    logits[:, 1].sum().backward()
    assert noisy.grad is not None
    assert torch.isfinite(noisy.grad).all()
    assert noisy.grad.abs().sum() > 0


class VotesFor(torch.nn.Module):
    """Logits that always favour one class; they still depend on the image (shape, grad)."""

    def __init__(self, label: int, num_classes: int = 4):
        super().__init__()
        self.register_buffer(
            "logits", torch.nn.functional.one_hot(torch.tensor(label), num_classes)
        )

    def forward(self, x):
        return self.logits.float() + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_denoise_and_classify_is_a_base_classifier_for_smooth(dds):
    from smoothing.core import Smooth

    model = DenoiseAndClassify(dds, VotesFor(2), SIGMA)
    smooth = Smooth(model, num_classes=4, sigma=SIGMA)
    x, _ = clean_and_noisy((3, 16, 16))
    generator = torch.Generator().manual_seed(0)
    assert smooth.predict(x, n=16, alpha=0.001, batch_size=8, generator=generator) == 2
    label, radius = smooth.certify(x, n0=8, n=16, alpha=0.001, batch_size=8, generator=generator)
    assert label == 2 and radius > 0


# ---------------------------------------------------------------- registry, errors


def test_registry_is_the_project_registry():
    assert isinstance(DENOISERS, Registry)
    assert {"dds", "if2"} <= set(DENOISERS.names())
    with pytest.raises(UnknownNameError, match="dds"):
        DENOISERS.build("no-such-denoiser", sigma=SIGMA)


def test_missing_local_directory_is_one_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "deeper" / "model"
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(missing))


def test_incomplete_directory_is_one_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="save_pretrained"):
        DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(tmp_path))


def test_uncached_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path / "hub")
    with pytest.raises(CheckpointNotFoundError) as info:
        DENOISERS.build("dds", sigma=SIGMA, checkpoint="google/ddpm-cifar10-32")
    message = str(info.value)
    assert "google/ddpm-cifar10-32" in message
    assert "hf download google/ddpm-cifar10-32" in message
    assert isinstance(info.value, ValueError)


def test_importing_denoisers_does_not_import_diffusers():
    code = "import sys, denoisers; sys.exit('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
