"""LGAP (seed 001, Sec. 3) on tiny models of the real classes (tests/tiny_purifier_models_lgap.py):
a BlipForConditionalGeneration + BlipProcessor and a StableDiffusionImg2ImgPipeline, saved
with save_pretrained and loaded back through `denoisers.purifiers.lgap`'s loaders.

Known answers: the img2img pass equals diffusers' own pipeline for the same captions and
generator; the caption that reaches the text encoder is BLIP's beam-search caption of the
image (spied on the tokenizer and the text encoder's input ids); the exact gradient is
the finite-difference one (gradcheck in float64); BPDA's is the classifier's gradient at
the purified point.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from denoisers.purifiers import build_purifier
from denoisers.purifiers.lgap import CAPTION_DECODING, LGAPPurifier, load_captioner, load_ldm
from denoisers.registry import CheckpointError, CheckpointNotFoundError
from smoothing.attacks import EOT, ThreatModel, cross_entropy_loss, pgd
from tests.tiny_models import go_offline, one_thread, save_to_hub_cache
from tests.tiny_purifier_models_lgap import (
    save_tiny_blip,
    save_tiny_sd,
    tiny_blip,
    tiny_sd_pipeline,
)

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SIZE = 16
STEPS = 4  # strength 0.5: 2 denoising steps


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lgap_models")
    return {"blip": save_tiny_blip(folder / "blip"), "sd": save_tiny_sd(folder / "sd")}


def classifier(channels: int = 3, size: int = SIZE, classes: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes)).eval()


def build(checkpoints, gradient="exact", channels=3, size=SIZE, **options):
    options = {
        "num_inference_steps": STEPS, "resolution": None,
        "caption_checkpoint": str(checkpoints["blip"]), "ldm_checkpoint": str(checkpoints["sd"]),
        **options,
    }
    return build_purifier("lgap", classifier=classifier(channels, size), gradient=gradient,
                          **options)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch=2, channels=3, size=SIZE, seed=0):
    return torch.rand(batch, channels, size, size, generator=seeded(seed))


@pytest.mark.parametrize("channels,size,resolution", [(3, 16, None), (3, 12, 16), (1, 8, 16)])
def test_output_has_the_input_shape_and_lies_in_the_unit_box(
    checkpoints, channels, size, resolution
):
    model = build(checkpoints, channels=channels, size=size, resolution=resolution)
    x = images(channels=channels, size=size)
    out = model.purifier.purify(x, seeded())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x, atol=1e-3)  # the tiny LDM changes the image
    assert model(x).shape == (2, 4)


def test_the_same_seed_gives_the_same_purification_and_another_seed_another(checkpoints):
    purifier = build(checkpoints).purifier
    x = images()
    first, again = purifier.purify(x, seeded(3)), purifier.purify(x, seeded(3))
    assert torch.equal(first, again)
    assert not torch.allclose(first, purifier.purify(x, seeded(4)), atol=1e-4)
    assert purifier.random


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_img2img_equals_the_diffusers_pipeline_for_the_same_generator(
    checkpoints, guidance_scale
):
    purifier = build(checkpoints, guidance_scale=guidance_scale, num_inference_steps=10).purifier
    x, captions = images(), ["a photo of a dog", "a red car"]
    ours = purifier.purify(x, seeded(5), captions=captions)
    theirs = purifier.pipeline(
        prompt=captions, image=x, strength=0.5, num_inference_steps=10,
        guidance_scale=guidance_scale, generator=seeded(5), output_type="pt",
    ).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_one_generator_per_image_makes_each_image_independent_of_the_batch(checkpoints):
    purifier = build(checkpoints).purifier
    x, captions = images(), ["a dog", "a cat"]
    batch = purifier.purify(x, [seeded(1), seeded(2)], captions=captions)
    alone = purifier.purify(x[1:], [seeded(2)], captions=captions[1:])
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=1e-6)
    theirs = purifier.pipeline(
        prompt=captions, image=x, strength=0.5, num_inference_steps=STEPS,
        generator=[seeded(1), seeded(2)], output_type="pt",
    ).images
    torch.testing.assert_close(batch, theirs, rtol=0, atol=1e-6)


def spy_text_inputs(monkeypatch, purifier):
    """Record what the LDM's tokenizer is asked to encode and the ids its text encoder gets."""
    tokenizer_type = type(purifier.pipeline.tokenizer)
    texts, ids = [], []
    original = tokenizer_type.__call__

    def tokenize(self, text, *args, **kwargs):
        texts.append(list(text) if isinstance(text, list | tuple) else [text])
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_type, "__call__", tokenize)
    hook = purifier.text_encoder.register_forward_pre_hook(
        lambda module, args: ids.append(args[0].clone())
    )
    return texts, ids, hook


def test_blips_caption_is_what_reaches_the_text_encoder(checkpoints, monkeypatch):
    purifier = build(checkpoints, guidance_scale=7.5).purifier
    x = images()
    # BLIP's captions of x, computed here with transformers alone (beam search 3/20/5).
    model, processor = load_captioner(checkpoints["blip"])
    inputs = processor(images=list(x), do_rescale=False, input_data_format="channels_first",
                       return_tensors="pt")
    tokens = model.generate(pixel_values=inputs["pixel_values"], **CAPTION_DECODING)
    expected = [c.strip() for c in processor.batch_decode(tokens, skip_special_tokens=True)]
    assert all(expected)

    texts, ids, hook = spy_text_inputs(monkeypatch, purifier)
    try:
        purifier.purify(x, seeded())
    finally:
        hook.remove()
    assert purifier.last_captions == expected
    assert expected in texts  # the pipeline tokenized exactly the captions
    tokenizer = purifier.pipeline.tokenizer
    caption_ids = tokenizer(expected, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""] * 2, padding="max_length",
                          max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    # Guidance: the captions, then the empty prompt; nothing else reaches the encoder.
    assert len(ids) == 2
    assert torch.equal(ids[0], caption_ids) and torch.equal(ids[1], empty_ids)


def test_each_image_is_conditioned_on_its_own_caption(checkpoints, monkeypatch):
    purifier = build(checkpoints, guidance_scale=1.0).purifier  # no guidance: one encoding
    captions = ["a photo of a dog", "a red car"]
    texts, ids, hook = spy_text_inputs(monkeypatch, purifier)
    try:
        swapped = purifier.purify(images(), seeded(), captions=captions[::-1])
        plain = purifier.purify(images(), seeded(), captions=captions)
    finally:
        hook.remove()
    tokenizer = purifier.pipeline.tokenizer
    for caption, row in zip(captions, ids[1], strict=True):
        assert torch.equal(row, tokenizer(caption, padding="max_length",
                                          max_length=tokenizer.model_max_length,
                                          return_tensors="pt").input_ids[0])
    assert captions in texts and captions[::-1] in texts
    assert not torch.allclose(swapped, plain, atol=1e-5)  # the caption conditions the output


def float64_purifier(tmp_path, resolution):
    pipeline = tiny_sd_pipeline(tmp_path, dtype=torch.float64)
    pipeline.set_progress_bar_config(disable=True)
    return LGAPPurifier(None, None, pipeline, num_inference_steps=STEPS, guidance_scale=7.5,
                        resolution=resolution)


@pytest.mark.parametrize("size,resolution,fast", [
    (8, None, True),
    (6, 8, True),
    # the full Jacobian against finite differences: 2 x 192 evaluations, 2-3 minutes
    pytest.param(8, None, False, marks=pytest.mark.slow),
])
def test_the_exact_gradient_is_the_finite_difference_one(tmp_path, size, resolution, fast):
    """fast: gradcheck's fast mode, which compares v' J u for random u, v (Jacobian-
    vector products) with finite differences; slow: every entry of the Jacobian."""
    purifier = float64_purifier(tmp_path, resolution)
    x = torch.rand(1, 3, size, size, dtype=torch.float64, generator=seeded(2))
    x.requires_grad_(True)

    def purify(inputs):
        # the same noise at every evaluation: a fixed function of x
        return purifier.purify(inputs, seeded(7), captions=["a dog"])

    assert torch.autograd.gradcheck(purify, (x,), eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=fast)


def input_gradient(model, x, seed=0, label=0):
    model.generator = seeded(seed)
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, label].sum(), x)
    return grad


def test_exact_equals_official_and_differs_from_bpda_which_is_the_classifiers(checkpoints):
    x = images()
    exact, official, bpda = (build(checkpoints, gradient=g) for g in ("exact", "official", "bpda"))
    g_exact, g_official, g_bpda = (input_gradient(m, x) for m in (exact, official, bpda))
    torch.testing.assert_close(g_exact, g_official, rtol=0, atol=0)
    assert g_exact.abs().sum() > 0
    assert not torch.allclose(g_exact, g_bpda, rtol=1e-2, atol=1e-6)
    # BPDA: the classifier's gradient at the purified point (identity backward).
    purified = exact.purifier.purify(x, seeded(0))
    weight = exact.classifier[1].weight[0].view(1, 3, SIZE, SIZE)
    torch.testing.assert_close(g_bpda, weight.expand_as(x))
    bpda.generator = seeded(0)
    torch.testing.assert_close(bpda(x), exact.classifier(purified))


def test_gradient_checkpointing_leaves_the_gradient_unchanged(checkpoints):
    x = images()
    checkpointed = build(checkpoints, gradient_checkpointing=True)
    plain = build(checkpoints, gradient_checkpointing=False)
    torch.testing.assert_close(input_gradient(checkpointed, x), input_gradient(plain, x),
                               rtol=1e-5, atol=1e-8)


class FixedNoise(nn.Module):
    """The purified model with the same draws at every call: a deterministic function."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        self.model.generator = seeded(11)
        return self.model(x)


def test_exact_pgd_goes_through_the_defense(checkpoints):
    model = FixedNoise(build(checkpoints))
    x, y = images(), torch.tensor([0, 1])
    threat = ThreatModel("linf", 8 / 255)
    with torch.no_grad():
        before = cross_entropy_loss(model(x), y)
    x_adv = pgd(model, x, y, threat, steps=3, step_size=1e-3, random_start=False)
    assert (threat.distance(x_adv, x) <= 8 / 255 + 1e-6).all()
    assert not torch.equal(x_adv, x)
    with torch.no_grad():
        after = cross_entropy_loss(model(x_adv), y)
    # Small signed steps along the exact gradient raise the loss (first order).
    assert (after > before).all()
    # The attacker's gradient is LGAP's Jacobian times the classifier's, not BPDA's.
    bpda = build(checkpoints, gradient="bpda")
    assert not torch.allclose(input_gradient(model.model, x, 11), input_gradient(bpda, x, 11),
                              rtol=1e-2, atol=1e-6)


def test_every_tiny_component_round_trips_through_the_loaders(checkpoints, tmp_path):
    model, processor = load_captioner(checkpoints["blip"])
    reference = tiny_blip(processor.tokenizer)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert processor.tokenizer.bos_token == "[DEC]"
    assert processor.tokenizer("a dog").input_ids == reference_ids(processor.tokenizer)

    loaded = load_ldm(checkpoints["sd"])
    built = tiny_sd_pipeline(tmp_path)
    for part in ("unet", "vae", "text_encoder"):
        saved = getattr(built, part).state_dict()
        for name, tensor in getattr(loaded, part).state_dict().items():
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    assert loaded.tokenizer("a red car").input_ids == built.tokenizer("a red car").input_ids
    assert type(loaded.scheduler).__name__ == "PNDMScheduler"
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    assert loaded.safety_checker is None


def reference_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    return [vocab["[CLS]"], vocab["a"], vocab["dog"], vocab["[SEP]"]]


def test_hub_ids_load_offline_from_the_cache(checkpoints, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    save_to_hub_cache(cache, "tiny/blip", checkpoints["blip"])
    save_to_hub_cache(cache, "tiny/sd", checkpoints["sd"])
    go_offline(monkeypatch, cache)
    model = build_purifier("lgap", classifier=classifier(), caption_checkpoint="tiny/blip",
                           ldm_checkpoint="tiny/sd", num_inference_steps=STEPS, resolution=None)
    assert model.settings["ldm_checkpoint"] == "tiny/sd"
    assert model.purifier.purify(images(), seeded()).shape == (2, 3, SIZE, SIZE)


def test_settings_record_every_choice(checkpoints):
    settings = build(checkpoints, strength=0.25, num_inference_steps=8).settings
    assert settings["strength"] == 0.25 and settings["denoising_steps"] == 2
    assert settings["guidance_scale"] == 7.5 and settings["resolution"] is None
    assert settings["caption_decoding"] == {"num_beams": 3, "max_length": 20, "min_length": 5}
    assert settings["scheduler"] == "PNDMScheduler" and settings["gradient"] == "exact"
    assert settings["official_gradient"].startswith("exact")


def test_a_missing_checkpoint_is_one_checkpoint_error(checkpoints, tmp_path, monkeypatch):
    go_offline(monkeypatch, tmp_path / "empty_cache")
    with pytest.raises(CheckpointNotFoundError, match="latent diffusion model"):
        build(checkpoints, ldm_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointNotFoundError, match="BLIP captioning model 'nobody/blip'"):
        build(checkpoints, caption_checkpoint="nobody/blip")
    with pytest.raises(CheckpointError, match="needs ldm_checkpoint"):
        build(checkpoints, ldm_checkpoint="")


@pytest.mark.parametrize("options,message", [
    ({"strength": 0.0}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"strength": 0.1, "num_inference_steps": 4}, "no denoising step"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"resolution": 13}, "multiple of the VAE's factor 2"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"min_length": 30}, "min_length"),
    ({"gradient": "bogus"}, "unknown gradient mode"),
])
def test_bad_settings_are_refused_with_one_value_error(checkpoints, options, message):
    with pytest.raises(ValueError, match=message):
        build(checkpoints, **options)


def test_a_classifier_that_is_not_a_module_and_bad_images_are_refused(checkpoints):
    with pytest.raises(ValueError, match="torch.nn.Module"):
        build_purifier("lgap", classifier=lambda x: x, caption_checkpoint=str(checkpoints["blip"]),
                       ldm_checkpoint=str(checkpoints["sd"]))
    purifier = build(checkpoints).purifier
    with pytest.raises(ValueError, match="4 channels"):
        purifier.purify(torch.rand(1, 4, SIZE, SIZE), seeded())
    with pytest.raises(ValueError, match="multiples of 2"):
        purifier.purify(torch.rand(1, 3, 7, 7), seeded())
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        purifier.purify(images(), seeded(), captions=["a dog"])



def test_eot_averages_fresh_draws_of_the_random_defense_and_pgd_runs_through_it(checkpoints):
    model, x, y = build(checkpoints), images(), torch.tensor([0, 1])
    model.generator = seeded(3)
    with torch.no_grad():
        first, second = model(x), model(x)  # two successive draws of the same generator
        model.generator = seeded(3)
        averaged = EOT(model, samples=2)(x)
    assert not torch.allclose(first, second)  # LGAP is random: EOT has something to average
    torch.testing.assert_close(averaged, (first + second) / 2)
    model.generator = seeded(3)
    x_adv = pgd(EOT(model, samples=2), x, y, ThreatModel("linf", 8 / 255), steps=1,
                random_start=False)
    # one signed step of 4/3 eps along a non-zero exact gradient moves every example
    assert (ThreatModel("linf", 8 / 255).distance(x_adv, x) > 0).all()


def test_an_unknown_option_is_refused_by_name_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="LGAP has no option guidance, steps$"):
        build_purifier("lgap", classifier=nn.Identity(), ldm_checkpoint=tmp_path / "absent",
                       steps=10, guidance=2.0)
