"""The DeepFloyd IF-II denoiser (Choi et al. 2024, Eq. 9) on a tiny IF-II pipeline.

The pipeline has IF-II's classes and structure (IFSuperResolutionPipeline, 6-channel
UNet2DConditionModel with timestep class labels and text embeddings, T5 encoder), is
saved with save_pretrained and loaded back through the builder a user calls with
"DeepFloyd/IF-II-L-v1.0".
"""

from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, IFSuperResolutionPipeline
from transformers import T5EncoderModel

from denoisers import DENOISERS, CheckpointNotFoundError, DenoiseAndClassify
from denoisers.if2 import IF2Denoiser, format_prompt
from tests.tiny_models import (
    add_random_lora,
    go_offline,
    save_tiny_if2,
    save_tiny_if2_lora,
    tiny_if2_pipeline,
)

SIGMA = 0.25
# DESIGN.md: IF-II's schedule reaches 2 * sigma at t = 289, 496, 702 for sigma 0.25,
# 0.5, 1.0; t' = floor(1.8 t) clamped to 999.
KNOWN = {0.25: (289, 520), 0.5: (496, 892), 1.0: (702, 999)}


@pytest.fixture(scope="module")
def if2_dir(tmp_path_factory):
    return save_tiny_if2(tmp_path_factory.mktemp("if2"))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return save_tiny_if2_lora(tmp_path_factory.mktemp("if2_lora"), seed=1)


@pytest.fixture(scope="module")
def denoiser(if2_dir):
    return DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_dir))


def noisy_batch(shape=(3, 3, 16, 16), sigma=SIGMA, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.8 * torch.rand(shape, generator=g)
    return x, x + sigma * torch.randn(shape, generator=g)


def record_unet_calls(model, monkeypatch, replacement=None):
    """Record every UNet call's arguments; run the real UNet unless given a replacement."""
    calls = []
    original = model.unet.forward

    def spy(sample, timestep, encoder_hidden_states=None, class_labels=None, **kwargs):
        calls.append(
            {
                "sample": sample.detach().clone(),
                "timestep": timestep,
                "encoder_hidden_states": encoder_hidden_states,
                "class_labels": class_labels,
            }
        )
        run = replacement or original
        return run(sample, timestep, encoder_hidden_states, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(model.unet, "forward", spy)
    return calls


def test_one_unet_call_per_batch_with_corrected_timestep_and_shared_embedding(
    denoiser, monkeypatch
):
    calls = record_unet_calls(denoiser, monkeypatch)
    _, noisy = noisy_batch()
    with torch.no_grad():
        out = denoiser(noisy, SIGMA)
    assert len(calls) == 1
    call = calls[0]
    t_hat, t_prime = KNOWN[SIGMA]
    assert call["timestep"].tolist() == [t_hat] * 3
    assert call["class_labels"].tolist() == [t_prime] * 3
    states = call["encoder_hidden_states"]
    assert states.shape[0] == 3
    assert states.stride(0) == 0  # a view of the one cached embedding, not copies
    assert states.data_ptr() == denoiser.prompt_embeds.data_ptr()
    # Both image inputs are sqrt(alpha_t_hat) * (2 x_noisy - 1), alpha from IF-II's schedule.
    alpha = float(
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod[
            t_hat
        ]
    )
    expected = math.sqrt(alpha) * (2 * noisy - 1)
    torch.testing.assert_close(call["sample"][:, :3], expected)
    torch.testing.assert_close(call["sample"][:, 3:], expected)
    assert out.shape == noisy.shape
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_timesteps_for_other_sigmas(if2_dir, denoiser, sigma, monkeypatch):
    # The loaded UNet and embedding, with the saved pipeline's own scheduler config.
    scheduler = DDPMScheduler.from_pretrained(str(if2_dir), subfolder="scheduler")
    model = IF2Denoiser(denoiser.unet, scheduler, denoiser.prompt_embeds, sigma, k=1.8)
    calls = record_unet_calls(model, monkeypatch)
    with torch.no_grad():
        model(noisy_batch((2, 3, 8, 8), sigma=sigma)[1], sigma)
    t_hat, t_prime = KNOWN[sigma]
    assert calls[0]["timestep"].tolist() == [t_hat] * 2
    assert calls[0]["class_labels"].tolist() == [t_prime] * 2
    assert (model.settings()["timestep"], model.settings()["corrected_timestep"]) == KNOWN[sigma]


def test_eq9_recovers_the_clean_image_when_the_noise_estimate_is_exact(denoiser, monkeypatch):
    x, noisy = noisy_batch()
    t_hat, _ = KNOWN[SIGMA]
    alpha = float(
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod[
            t_hat
        ]
    )

    def exact(sample, timestep, encoder_hidden_states=None, class_labels=None, **kwargs):
        # The noise of the forward process x_t = sqrt(a) x0 + sqrt(1 - a) eps, for the
        # noisy half of the input, and a variance prediction to be ignored.
        eps = (sample[:, :3] - math.sqrt(alpha) * (2 * x - 1)) / math.sqrt(1 - alpha)
        return (torch.cat([eps, torch.full_like(eps, -50.0)], dim=1),)

    record_unet_calls(denoiser, monkeypatch, replacement=exact)
    out = denoiser(noisy, SIGMA)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_images_are_denoised_at_their_own_size(denoiser, monkeypatch):
    calls = record_unet_calls(denoiser, monkeypatch)
    _, noisy = noisy_batch((2, 3, 12, 10))
    with torch.no_grad():
        out = denoiser(noisy, SIGMA)
    assert tuple(calls[0]["sample"].shape) == (2, 6, 12, 10)  # no resampling
    assert out.shape == noisy.shape
    # Odd sizes, which IF-II's up blocks cannot take, are padded to the next multiple of
    # the downsampling factor (2 here) and cropped back.
    _, noisy = noisy_batch((2, 3, 15, 13))
    with torch.no_grad():
        out = denoiser(noisy, SIGMA)
    assert tuple(calls[1]["sample"].shape) == (2, 6, 16, 14)
    assert out.shape == noisy.shape
    assert torch.isfinite(out).all()


def test_text_encoder_is_released_after_construction(if2_dir, monkeypatch):
    refs = []
    original = IFSuperResolutionPipeline.encode_prompt

    def encode_and_watch(self, *args, **kwargs):
        refs.append(weakref.ref(self.text_encoder))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IFSuperResolutionPipeline, "encode_prompt", encode_and_watch)
    model = DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_dir))
    gc.collect()
    assert len(refs) == 1
    assert refs[0]() is None
    assert not any(isinstance(m, T5EncoderModel) for m in model.modules())


def test_prompt_embedding_is_the_pipelines_own(if2_dir):
    pipeline = IFSuperResolutionPipeline.from_pretrained(str(if2_dir), use_safetensors=True)
    with torch.no_grad():
        empty, _ = pipeline.encode_prompt("", do_classifier_free_guidance=False)
        sks, _ = pipeline.encode_prompt("this is a photo of a sks.", False)
    default = DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_dir))
    personal = DENOISERS.build(
        "if2",
        sigma=SIGMA,
        checkpoint=str(if2_dir),
        prompt="This is a photo of a {}.",
        token="sks",
    )
    torch.testing.assert_close(default.prompt_embeds, empty)
    torch.testing.assert_close(personal.prompt_embeds, sks)
    assert not torch.allclose(empty, sks)
    assert personal.settings()["prompt"] == "This is a photo of a sks."
    assert personal.settings()["prompt_template"] == "This is a photo of a {}."


def test_format_prompt():
    assert format_prompt("") == ""
    assert format_prompt("a photo of a {}", "sks") == "a photo of a sks"
    assert format_prompt("a photo of a {}") == "a photo of a "
    with pytest.raises(ValueError, match="placeholder"):
        format_prompt("a photo", "sks")


def test_saved_pipeline_denoises_like_the_in_memory_one(denoiser):
    # Same seed, same weights: loading from disk must not change anything.
    pipeline = tiny_if2_pipeline(seed=0)
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt("", do_classifier_free_guidance=False)
    direct = IF2Denoiser(pipeline.unet, pipeline.scheduler, embeds, SIGMA, k=1.8)
    _, noisy = noisy_batch((2, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(denoiser(noisy, SIGMA), direct(noisy, SIGMA))
    loaded = denoiser.unet.state_dict()
    for name, tensor in pipeline.unet.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


def test_lora_weights_load_and_change_the_output(if2_dir, lora_dir, denoiser):
    with_lora = DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_dir), lora=str(lora_dir))
    # The same adapter attached in memory (same seed) is the expected result.
    pipeline = tiny_if2_pipeline(seed=0)
    add_random_lora(pipeline.unet, seed=1)
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt("", do_classifier_free_guidance=False)
    expected = IF2Denoiser(pipeline.unet, pipeline.scheduler, embeds, SIGMA)
    _, noisy = noisy_batch((2, 3, 16, 16))
    with torch.no_grad():
        out, base = with_lora(noisy, SIGMA), denoiser(noisy, SIGMA)
        reference = expected(noisy, SIGMA)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    assert with_lora.settings()["lora"] == str(lora_dir)


def test_bf16_unet_with_fp32_output(if2_dir, denoiser, monkeypatch):
    model = DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_dir), dtype="bf16")
    assert model.unet.dtype == torch.bfloat16
    assert model.prompt_embeds.dtype == torch.bfloat16
    calls = record_unet_calls(model, monkeypatch)
    _, noisy = noisy_batch((1, 3, 8, 8))
    with torch.no_grad():
        out, reference = model(noisy, SIGMA), denoiser(noisy, SIGMA)
    assert calls[0]["sample"].dtype == torch.bfloat16
    assert out.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: the same weights give the same image to about 1e-2.
    assert (out - reference).abs().mean() < 1e-2
    assert model.settings()["dtype"] == "bf16"


def test_settings_are_json_and_complete(denoiser, if2_dir):
    settings = json.loads(json.dumps(denoiser.settings()))
    t_hat, t_prime = KNOWN[SIGMA]
    assert settings["denoiser"] == "if2"
    assert settings["checkpoint"] == str(if2_dir)
    assert settings["sigma"] == SIGMA
    assert settings["timestep"] == t_hat
    assert settings["corrected_timestep"] == t_prime
    assert settings["k"] == 1.8
    assert settings["timestep_rounding"] == "floor"
    assert settings["prompt"] == ""
    assert settings["lora"] is None
    assert settings["dtype"] == "fp32"
    assert settings["schedule_noise_level"] == pytest.approx(2 * SIGMA, rel=0.01)


def test_sigma_mismatch_raises(denoiser):
    with pytest.raises(ValueError, match="sigma"):
        denoiser(noisy_batch((1, 3, 8, 8))[1], 0.5)


def test_gradients_reach_the_input(denoiser):
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    model = DenoiseAndClassify(denoiser, classifier, SIGMA)
    _, noisy = noisy_batch((2, 3, 8, 8))
    noisy.requires_grad_(True)
    model(noisy).sum().backward()
    assert noisy.grad is not None and torch.isfinite(noisy.grad).all()
    assert noisy.grad.abs().sum() > 0


def test_real_checkpoint_name_without_weights_is_one_clear_error(monkeypatch, tmp_path):
    go_offline(monkeypatch, tmp_path / "hub")
    with pytest.raises(CheckpointNotFoundError) as info:
        DENOISERS.build("if2", sigma=SIGMA)  # default checkpoint: DeepFloyd/IF-II-L-v1.0
    message = str(info.value)
    assert "DeepFloyd/IF-II-L-v1.0" in message
    assert "hf download DeepFloyd/IF-II-L-v1.0" in message
    assert "license" in message
    assert isinstance(info.value, ValueError)


def test_timestep_helpers_agree_with_known_table():
    # The denoiser's t_hat/t' come from denoisers.timesteps; cross-check the table itself
    # against IF-II's schedule computed here.
    a = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    levels = np.sqrt((1 - a.alphas_cumprod.double().numpy()) / a.alphas_cumprod.double().numpy())
    for sigma, (t_hat, t_prime) in KNOWN.items():
        assert levels[t_hat - 1] < 2 * sigma <= levels[t_hat]
        assert t_prime == min(math.floor(1.8 * t_hat), 999)


# --- Rounding of the corrected timestep: floor (default) or the reference code's float ---

# The reference (robustify-T2I IF_robust_model.py) feeds 1.8 * t as a float and sets it
# to T = 1000 where it exceeds T.
KNOWN_REFERENCE = {0.25: 289 * 1.8, 0.5: 496 * 1.8, 1.0: 1000.0}


def test_corrected_timestep_reference_rounding_is_the_float_clamped_at_T():
    from denoisers.timesteps import corrected_timestep

    assert corrected_timestep(289, 1.8, 1000, "reference") == pytest.approx(520.2, abs=1e-9)
    assert corrected_timestep(496, 1.8, 1000, "reference") == pytest.approx(892.8, abs=1e-9)
    assert corrected_timestep(702, 1.8, 1000, "reference") == 1000.0  # 1263.6 -> T
    assert corrected_timestep(555, 1.8, 1000, "reference") == 999.0  # exactly 999.0
    assert corrected_timestep(289, 1.8, 1000) == 520  # the default is floor
    for rounding in ("floor", "reference"):
        assert corrected_timestep(289, 0.0, 1000, rounding) == 0
    with pytest.raises(ValueError, match="unknown timestep rounding 'round'"):
        corrected_timestep(289, 1.8, 1000, "round")
    # The reference computes `timesteps[0] * 1.8` on the scheduler's int64 timestep: a
    # float32 tensor, equal to ours as the UNet gets it.
    for t in (289, 496, 555):
        reference = torch.tensor([torch.tensor(t) * 1.8])
        ours = torch.tensor([corrected_timestep(t, 1.8, 1000, "reference")], dtype=torch.float32)
        assert reference.dtype == torch.float32 and torch.equal(reference, ours)


def test_a_float_class_label_gets_its_own_timestep_embedding(denoiser):
    # diffusers' UNet2DConditionModel with class_embed_type="timestep" passes class_labels
    # through its sinusoidal `time_proj`, which takes floats: 520.2 is not embedded as 520.
    unet = denoiser.unet
    assert unet.config.class_embed_type == "timestep"
    sample = torch.zeros(1, 6, 8, 8)
    with torch.no_grad():
        at_520 = unet.get_class_embed(sample, torch.tensor([520]))
        at_520_float = unet.get_class_embed(sample, torch.tensor([520.0]))
        at_520_2 = unet.get_class_embed(sample, torch.tensor([520.2]))
    torch.testing.assert_close(at_520, at_520_float)  # the integer is the same level
    assert (at_520_2 - at_520).abs().max() > 1e-4


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_reference_rounding_feeds_the_float_level_to_the_unet(denoiser, sigma, monkeypatch):
    model = denoiser.at(sigma, timestep_rounding="reference")
    floor_model = denoiser.at(sigma)
    assert floor_model.timestep_rounding == "floor"
    calls = record_unet_calls(model, monkeypatch)
    noisy = noisy_batch((2, 3, 8, 8), sigma=sigma)[1]
    with torch.no_grad():
        out = model(noisy, sigma)
        floor_out = floor_model(noisy, sigma)
    labels = calls[0]["class_labels"]
    assert labels.dtype == torch.float32
    expected = torch.tensor([KNOWN_REFERENCE[sigma]] * 2, dtype=torch.float32)
    torch.testing.assert_close(labels, expected, rtol=0, atol=0)
    assert calls[0]["timestep"].tolist() == [KNOWN[sigma][0]] * 2
    settings = json.loads(json.dumps(model.settings()))
    assert settings["timestep_rounding"] == "reference"
    assert settings["corrected_timestep"] == pytest.approx(KNOWN_REFERENCE[sigma], abs=1e-9)
    assert floor_model.settings()["corrected_timestep"] == KNOWN[sigma][1]
    # the fraction (or 1000 vs 999) reaches the output
    assert (out - floor_out).abs().max() > 1e-6


def test_k_zero_conditions_on_level_zero(denoiser, monkeypatch):
    for rounding in ("floor", "reference"):
        model = denoiser.at(SIGMA, k=0.0, timestep_rounding=rounding)
        calls = record_unet_calls(model, monkeypatch)
        with torch.no_grad():
            model(noisy_batch((1, 3, 8, 8))[1], SIGMA)
        assert calls[-1]["class_labels"].tolist() == [0]
        assert model.settings()["corrected_timestep"] == 0
        assert calls[-1]["timestep"].tolist() == [KNOWN[SIGMA][0]]  # t_hat is unchanged


def test_unknown_rounding_is_refused(denoiser):
    with pytest.raises(ValueError, match="unknown timestep rounding 'nearest'"):
        denoiser.at(SIGMA, timestep_rounding="nearest")


def test_denoise_at_timesteps_rounds_as_asked(denoiser, monkeypatch):
    from denoisers.if2 import denoise_at_timesteps

    calls = record_unet_calls(denoiser, monkeypatch)
    timesteps = torch.tensor([289, 702])
    x_t = torch.zeros(2, 3, 8, 8)
    alphas = denoiser.scheduler.alphas_cumprod
    with torch.no_grad():
        denoise_at_timesteps(denoiser.unet, x_t, timesteps, denoiser.prompt_embeds,
                             alphas_cumprod=alphas)
        denoise_at_timesteps(denoiser.unet, x_t, timesteps, denoiser.prompt_embeds,
                             alphas_cumprod=alphas, timestep_rounding="reference")
    assert calls[0]["class_labels"].tolist() == [520, 999]
    assert calls[0]["class_labels"].dtype == torch.long
    torch.testing.assert_close(calls[1]["class_labels"],
                               torch.tensor([289 * 1.8, 1000.0], dtype=torch.float32))


def test_reference_rounding_keeps_its_float_label_with_a_bf16_unet(if2_dir, monkeypatch):
    # bf16 cannot hold 520.2 (it rounds to 520): the label must stay float32 up to the
    # UNet's sinusoidal embedding, whatever the UNet's dtype.
    model = DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(if2_dir), dtype="bf16",
                            timestep_rounding="reference")
    assert model.unet.dtype == torch.bfloat16
    calls = record_unet_calls(model, monkeypatch)
    with torch.no_grad():
        out = model(noisy_batch((1, 3, 8, 8))[1], SIGMA)
    assert calls[0]["class_labels"].dtype == torch.float32
    assert calls[0]["class_labels"].tolist() == [pytest.approx(520.2, abs=1e-4)]
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert model.settings()["timestep_rounding"] == "reference"
