"""`adapt.personalize` (Eq. 10-12) on a tiny IF-II pipeline and a tiny CLIP, two tiny
reference images, a few steps.

What must hold: both loss terms are finite; the total decreases on a fixed batch; only
LoRA parameters change; the saved LoRA reloads through the path `certify --denoiser if2
--lora DIR` takes and changes the denoiser's output; lambda = 0 is plain DreamBooth (the
classifier is never built, and L_diff is the DreamBooth loss computed independently);
an interrupted run resumed equals an uninterrupted one; the memory savers (bf16,
gradient checkpointing) run on the CPU; bad input is refused with one AdaptError and
nothing changed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import adapt.personalize as module
from adapt.errors import AdaptError
from adapt.personalize import LORA_WEIGHTS, PersonalizeConfig, personalize
from tests.cli_helpers import rows
from tests.tiny_classifiers import clip_options, save_tiny_clip, snapshot, write_reference_set
from tests.tiny_models import one_thread, save_tiny_if2

CLASSES = ["dog", "cat"]

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("personalize_models")
    return {
        "if2": save_tiny_if2(folder / "if2"),
        "clip": save_tiny_clip(folder / "clip"),
        "references": write_reference_set(folder / "refs", CLASSES, shots=1, size=32),
    }


@pytest.fixture
def config(tiny, tmp_path):
    def make(**changes) -> PersonalizeConfig:
        settings = dict(
            references=str(tiny["references"]),
            out=str(tmp_path / "lora"),
            checkpoint=str(tiny["if2"]),
            classifier="clip-b32",
            classifier_options=clip_options(tiny["clip"], tmp_path / "text_cache"),
            lam=0.5,  # large, so that L_clf matters for the tiny models
            steps=4,
            lr=1e-3,
            batch_size=2,
            checkpoint_every=2,
            resolution=32,
        )
        settings.update(changes)
        return PersonalizeConfig(**settings)

    return make


def log_rows(out):
    return rows(out / "loss_log")


@pytest.fixture
def captured_unet(monkeypatch):
    """The UNet `personalize` trains, kept for inspection after the run."""
    seen = {}
    original = module.add_lora

    def add_lora(unet, rank):
        seen["unet"] = unet
        return original(unet, rank)

    monkeypatch.setattr(module, "add_lora", add_lora)
    return seen


def test_a_run_trains_only_lora_with_finite_loss_terms_and_writes_its_files(
    config, tiny, captured_unet
):
    from diffusers import UNet2DConditionModel

    out = personalize(config(), progress=False)
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for row in rows:
        l_diff, l_clf, loss = float(row["L_diff"]), float(row["L_clf"]), float(row["loss"])
        assert math.isfinite(l_diff) and math.isfinite(l_clf) and l_clf > 0
        assert loss == pytest.approx(l_diff + 0.5 * l_clf, rel=1e-6)

    # Only the LoRA parameters changed: every base weight equals the checkpoint's.
    trained = captured_unet["unet"].state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny["if2"], subfolder="unet").state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for key, value in trained.items():
        if "lora_" in key:
            continue
        original = key.replace(".base_layer.", ".")
        assert torch.equal(value, base[original]), key
    # B starts at zero (the adapted UNet starts as the pretrained one) and moved.
    assert any(k.endswith("lora_B.default.weight") and trained[k].abs().sum() > 0
               for k in lora_keys)

    saved = load_file(str(out / LORA_WEIGHTS))
    assert saved and all("lora" in k for k in saved)
    record = json.loads((out / "adapt_config.json").read_text())
    assert record["status"] == "complete"
    assert record["certify"]["lora"] == str(out) and record["certify"]["token"] == "sks"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints").exists()  # pruned once the run is complete


def test_the_saved_lora_reloads_as_certify_loads_it_and_changes_the_denoiser(config, tiny):
    from denoisers.if2 import IF2Denoiser

    out = personalize(config(steps=3, checkpoint_every=0), progress=False)
    noisy = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    common = dict(sigma=0.5, prompt="a photo of a {}.", token="sks")
    plain = IF2Denoiser.from_pretrained(tiny["if2"], **common)
    personalized = IF2Denoiser.from_pretrained(tiny["if2"], lora=out, **common)
    assert personalized.settings()["lora"] == str(out)
    with torch.no_grad():
        difference = (plain(noisy, 0.5) - personalized(noisy, 0.5)).abs().max()
    assert difference > 1e-5


def test_the_total_loss_decreases_on_a_fixed_batch(tiny):
    """Eq. 12 minimized by AdamW on one batch: fixed images, labels, timesteps, noise."""
    import classifiers
    from denoisers.if2 import load_if2

    parts = load_if2(tiny["if2"], prompt="a photo of a {}.", token="sks")
    lora = module.add_lora(parts.unet, rank=4)
    parts.unet.train()
    classifier = classifiers.build_classifier(
        "clip-b32", class_names=CLASSES,
        **clip_options(tiny["clip"], tiny["clip"].parent / "cache"),
    ).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    images = 2 * torch.rand(2, 3, 32, 32, generator=generator) - 1
    noise = torch.randn(2, 3, 32, 32, generator=generator)
    timesteps, labels = torch.tensor([150, 600]), torch.tensor([0, 1])
    optimizer = torch.optim.AdamW(list(lora.values()), lr=1e-2)
    totals = []
    for _ in range(20):
        loss, l_diff, l_clf = module.personalization_losses(
            parts.unet, images, labels, timesteps, noise, scheduler=parts.scheduler,
            prompt_embeds=parts.prompt_embeds, k=1.8, classifier=classifier, lam=0.5,
        )
        assert torch.isfinite(l_diff) and torch.isfinite(l_clf)
        totals.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sum(totals[-3:]) / 3 < sum(totals[:3]) / 3
    assert min(totals) < totals[0]


def test_lambda_zero_is_plain_dreambooth(config, tiny, monkeypatch):
    """lam = 0: no classifier at all, and L_diff of step 1 is the DreamBooth loss computed
    here independently (x_t of Eq. 5, the UNet on [x_t, x_t] at level floor(k t))."""
    from adapt.training import STREAM_STEP, step_generator, stream_batch
    from denoisers.if2 import load_if2

    def no_classifier(*args, **kwargs):
        raise AssertionError("lam = 0 must not build a classifier")

    monkeypatch.setattr(module, "build_frozen_classifier", no_classifier)
    out = personalize(config(lam=0.0, steps=1, checkpoint_every=0), progress=False)
    row = log_rows(out)[0]
    assert row["L_clf"] == "nan" and float(row["loss"]) == float(row["L_diff"])

    from adapt.references import load_reference_set

    references = load_reference_set(tiny["references"], size=32)
    indices = stream_batch(0, 0, 2, len(references))
    images = torch.stack([references[i][0] for i in indices]) * 2 - 1
    generator = step_generator(0, STREAM_STEP, 0)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    parts = load_if2(tiny["if2"], prompt="a photo of a {}.", token="sks")
    a = parts.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = a.sqrt() * images + (1 - a).sqrt() * noise
    levels = torch.clamp((1.8 * timesteps.double()).floor().long(), max=999)
    with torch.no_grad():  # the LoRA starts as a no-op (B = 0): the pretrained UNet
        out_unet = parts.unet(torch.cat([x_t, x_t], 1), timesteps,
                              encoder_hidden_states=parts.prompt_embeds.expand(2, -1, -1),
                              class_labels=levels).sample
    expected = F.mse_loss(out_unet[:, :3], noise)
    assert float(row["L_diff"]) == pytest.approx(float(expected), rel=1e-5)

    # and lam > 0 adds the classifier term on top of the same L_diff at step 1
    monkeypatch.undo()
    guided = personalize(config(out=str(out.parent / "guided"), steps=1, checkpoint_every=0),
                         progress=False)
    assert float(log_rows(guided)[0]["L_diff"]) == pytest.approx(float(row["L_diff"]), rel=1e-6)
    assert float(log_rows(guided)[0]["L_clf"]) > 0


def test_resume_after_interruption_equals_an_uninterrupted_run(config, tmp_path, monkeypatch):
    whole = personalize(config(out=str(tmp_path / "whole")), progress=False)

    calls = {"n": 0}
    original = module.personalization_losses

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3, after the checkpoint of step 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "personalization_losses", interrupted)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        personalize(config(out=str(resumed)), progress=False)
    assert not (resumed / LORA_WEIGHTS).exists()
    monkeypatch.setattr(module, "personalization_losses", original)
    personalize(config(out=str(resumed)), progress=False)

    a, b = load_file(str(whole / LORA_WEIGHTS)), load_file(str(resumed / LORA_WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    columns = ["step", "loss", "L_diff", "L_clf", "lr"]
    assert [[r[c] for c in columns] for r in log_rows(whole)] == [
        [r[c] for c in columns] for r in log_rows(resumed)
    ]
    record = json.loads((resumed / "adapt_config.json").read_text())
    assert [r["step"] for r in record["resumed"]] == [2]


def test_bf16_and_gradient_checkpointing_run_on_the_cpu(config, captured_unet):
    out = personalize(
        config(mixed_precision="bf16", gradient_checkpointing=True, steps=2, checkpoint_every=0),
        progress=False,
    )
    unet = captured_unet["unet"]
    assert unet.dtype == torch.bfloat16 or any(
        p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora_" not in n
    )
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if "lora_" in n)
    assert unet.is_gradient_checkpointing
    assert all(math.isfinite(float(r["loss"])) for r in log_rows(out))


def test_8bit_adam_without_bitsandbytes_is_one_clear_error(config, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(AdaptError, match="bitsandbytes"):
            personalize(config(use_8bit_adam=True), progress=False)
        assert not (tmp_path / "lora").exists()
    else:
        pytest.skip("bitsandbytes is installed: the 8-bit path is exercised on CUDA only")


# -- bad input ----------------------------------------------------------------------------


def test_a_reference_folder_without_images_is_refused(config, tmp_path):
    empty = tmp_path / "empty"
    (empty / "dog").mkdir(parents=True)
    out = tmp_path / "lora"
    with pytest.raises(AdaptError, match="holds no images"):
        personalize(config(references=str(empty)), progress=False)
    assert not out.exists()


def test_an_out_folder_with_another_runs_weights_is_refused_untouched(config, tmp_path):
    out = tmp_path / "lora"
    out.mkdir()
    (out / LORA_WEIGHTS).write_bytes(b"someone else's LoRA")
    before = snapshot(out)
    with pytest.raises(AdaptError, match="another run") as caught:
        personalize(config(), progress=False)
    assert "--overwrite" in str(caught.value) and str(out) in str(caught.value)
    assert snapshot(out) == before


def test_an_out_folder_of_a_run_with_other_settings_is_refused_untouched(config):
    out = personalize(config(steps=1, checkpoint_every=0), progress=False)
    before = snapshot(out)
    with pytest.raises(AdaptError, match=r"other settings \(steps: 1 -> 2\)"):
        personalize(config(steps=2, checkpoint_every=0), progress=False)
    assert snapshot(out) == before
