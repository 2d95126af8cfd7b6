"""`adapt.finetune` (Eq. 13) on tiny models of the real classes: a tiny IF-II pipeline
(tests/tiny_models.py), a tiny open_clip CLIP and a tiny torchvision ResNet saved as
files (tests/tiny_classifiers.py), the bundled digits CNN and digits DDPM.

What must hold: fine-tuning changes the classifier's weights; the saved weights reload
through `certify --classifier-weights` and give other logits than the untuned model; for
CLIP the class embeddings after loading are the ones recomputed by hand from the tuned
text encoder; an interrupted run resumed equals an uninterrupted one; bad input is
refused with one AdaptError and nothing changed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adapt.errors import AdaptError
from adapt.finetune import CLASSIFIER_WEIGHTS, FinetuneConfig, FrozenDenoiser, finetune
from tests.cli_helpers import invoke, sidecar
from tests.tiny_classifiers import (
    clip_options,
    save_tiny_clip,
    save_tiny_resnet,
    snapshot,
    write_reference_set,
)
from tests.tiny_models import one_thread, save_tiny_if2

CLASSES = ["dog", "cat"]

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_models")
    return {
        "if2": save_tiny_if2(folder / "if2"),
        "clip": save_tiny_clip(folder / "clip"),
        "resnet": save_tiny_resnet(folder / "resnet.safetensors", len(CLASSES)),
        "references": write_reference_set(folder / "refs", CLASSES, shots=2, size=32),
    }


@pytest.fixture
def clip_config(tiny, tmp_path):
    def make(**changes) -> FinetuneConfig:
        settings = dict(
            references=str(tiny["references"]),
            out=str(tmp_path / "out"),
            classifier="clip-b32",
            classifier_options=clip_options(tiny["clip"], tmp_path / "text_cache"),
            denoiser_checkpoint=str(tiny["if2"]),
            epochs=2,
            lr=1e-3,  # large, so a few steps move the tiny model visibly
            batch_size=2,
            checkpoint_every=1,
            resolution=32,
        )
        settings.update(changes)
        return FinetuneConfig(**settings)

    return make


def build(name, weights=None, **options):
    import classifiers

    if weights is not None:
        options["weights"] = str(weights)
    return classifiers.build_classifier(name, class_names=CLASSES, **options).eval()


def test_clip_finetuning_changes_both_encoders_and_reloads_with_fresh_class_embeddings(
    clip_config, tiny, tmp_path
):
    config = clip_config()
    out = finetune(config, progress=False)
    tuned_state = load_file(str(out / CLASSIFIER_WEIGHTS))
    options = dict(config.classifier_options)
    untuned = build("clip-b32", **options)
    before = untuned.model.state_dict()
    assert set(tuned_state) == set(before)
    changed = {k for k in before if not torch.equal(before[k], tuned_state[k])}
    assert any(k.startswith("visual.") for k in changed)  # the image encoder
    assert any(k.startswith("transformer.") for k in changed)  # the text encoder
    assert "logit_scale" not in changed  # the temperature stays fixed

    # Loaded as certify loads it: class embeddings from the tuned text encoder.
    tuned = build("clip-b32", weights=out / CLASSIFIER_WEIGHTS, **options)
    with torch.no_grad():
        by_hand = []
        for name in CLASSES:
            prompts = [t.replace("{}", name) for t in tuned.templates]
            text = F.normalize(tuned.model.encode_text(tuned.tokenizer(prompts)), dim=-1)
            by_hand.append(F.normalize(text.mean(0), dim=-1))
    by_hand = torch.stack(by_hand)
    torch.testing.assert_close(tuned.class_embeddings, by_hand, rtol=0, atol=1e-6)
    assert not torch.allclose(untuned.class_embeddings, tuned.class_embeddings, atol=1e-4)

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(untuned(images), tuned(images), atol=1e-4)

    record = json.loads((out / "finetune_config.json").read_text())
    assert record["status"] == "complete" and record["kind"] == "finetune"
    assert record["steps"] == 4  # 2 epochs of 4 references in batches of 2
    rows = (out / "loss_log.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["step", "epoch", "L_clf", "accuracy"] and len(rows) == 5
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_loss_decreases_on_a_fixed_batch(clip_config, tiny, tmp_path):
    """Many steps on one batch of 2 references at fixed sigma: Eq. 13 is being minimized."""
    refs = write_reference_set(tmp_path / "two", CLASSES, shots=1, size=32, seed=3)
    config = clip_config(references=str(refs), epochs=12, lr=1e-3, sigmas=[0.25],
                         lr_scheduler="constant", checkpoint_every=0)
    out = finetune(config, progress=False)
    losses = [float(r.split("\t")[2]) for r in (out / "loss_log.tsv").read_text().splitlines()[1:]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_at_given_sigmas_training_sees_what_certify_feeds_the_classifier(clip_config, tiny):
    """sigmas mode: x + sigma eps through the IF2Denoiser of certify, bit for bit."""
    from denoisers.if2 import IF2Denoiser

    config = clip_config(sigmas=[0.25, 0.5], prompt="a photo of a {}.", token="sks")
    frozen = FrozenDenoiser(config, torch.device("cpu"))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    draws = torch.tensor([0, 1, 1, 0])
    denoised = frozen.denoise(images, noise, draws)
    for sigma_index, sigma in enumerate([0.25, 0.5]):
        certify_denoiser = IF2Denoiser.from_pretrained(
            tiny["if2"], sigma=sigma, prompt="a photo of a {}.", token="sks"
        )
        rows = draws == sigma_index
        with torch.no_grad():
            expected = certify_denoiser(images[rows] + sigma * noise[rows], sigma)
        torch.testing.assert_close(denoised[rows], expected, rtol=1e-5, atol=1e-5)


def test_resume_after_interruption_equals_an_uninterrupted_run(clip_config, tmp_path, monkeypatch):
    whole = finetune(clip_config(out=str(tmp_path / "whole")), progress=False)

    import adapt.finetune as module

    calls = {"n": 0}
    original = module.classifier_logits

    def interrupted(classifier, images, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4, after the checkpoint of step 3
            raise KeyboardInterrupt
        return original(classifier, images, *args)

    monkeypatch.setattr(module, "classifier_logits", interrupted)
    resumed_out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(clip_config(out=str(resumed_out)), progress=False)
    assert not (resumed_out / CLASSIFIER_WEIGHTS).exists()
    assert (resumed_out / "checkpoints" / "step_3").is_dir()
    monkeypatch.setattr(module, "classifier_logits", original)
    finetune(clip_config(out=str(resumed_out)), progress=False)

    a = load_file(str(whole / CLASSIFIER_WEIGHTS))
    b = load_file(str(resumed_out / CLASSIFIER_WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    log_a = [r.split("\t")[:4] for r in (whole / "loss_log.tsv").read_text().splitlines()]
    log_b = [r.split("\t")[:4] for r in (resumed_out / "loss_log.tsv").read_text().splitlines()]
    assert log_a == log_b
    record = json.loads((resumed_out / "finetune_config.json").read_text())
    assert [r["step"] for r in record["resumed"]] == [3]


def test_torchvision_finetuning_reloads_into_certify(tiny, tmp_path, monkeypatch):
    """A ResNet with a 2-class head, tuned on IF-II-denoised references, certified."""
    from cli.main import certify_command

    out = finetune(
        FinetuneConfig(
            references=str(tiny["references"]), out=str(tmp_path / "out"), classifier="resnet18",
            classifier_options={"weights": str(tiny["resnet"])},
            denoiser_checkpoint=str(tiny["if2"]), epochs=1, lr=1e-2, batch_size=4,
            sigmas=[0.5], resolution=32,
        ),
        progress=False,
    )
    weights = out / CLASSIFIER_WEIGHTS
    untuned, tuned = build("resnet18", tiny["resnet"]), build("resnet18", weights)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(untuned(images), tuned(images), atol=1e-4)
    # batch norm statistics were updated in train mode, as in the reference code
    assert not torch.equal(untuned.model.bn1.running_mean, tuned.model.bn1.running_mean)

    # certify on the reference images themselves (an ImageFolder tree of 32 x 32 images
    # would be cropped to 224 by the folder dataset, slow for IF-II on a CPU).
    monkeypatch.setattr("classifiers.datasets.image_transform",
                        _native_transform(), raising=True)
    folder = _image_folder(tmp_path / "test_images", tiny["references"])
    stem = tmp_path / "cert"
    result = invoke(certify_command, "--model", "resnet18", "--classifier-weights", str(weights),
                    "--denoiser", "if2", "--denoiser-checkpoint", str(tiny["if2"]),
                    "--dataset", f"folder:{folder}", "--sigma", "0.5", "--n0", "2", "--n", "4",
                    "--max", "2", "--device", "cpu", "--out", str(stem), "--quiet",
                    catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "cert.tsv").read_text().splitlines()) == 3
    assert sidecar(stem)["settings"]["classifier_weights"] == str(weights)


def _native_transform():
    from classifiers.datasets import image_transform

    return lambda size="crop": image_transform("native")


def _image_folder(root, references):
    import shutil

    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for path in sorted((references / "images" / f"{label:04d}").glob("*.png")):
            shutil.copy(path, root / name / path.name)
    return root


def test_digits_cnn_finetuned_with_the_bundled_ddpm_reloads_into_certify(tmp_path):
    """The offline default: digits-clean behind the bundled digits DDPM (dds, given sigma)."""
    from PIL import Image

    import denoisers
    from classifiers.digits import load_digits_split
    from cli.main import certify_command

    train = load_digits_split("train")
    refs = tmp_path / "digit_refs"
    for label in range(10):
        index = int((train.labels == label).nonzero()[0])
        (refs / str(label)).mkdir(parents=True)
        pixels = (train.images[index, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(refs / str(label) / "0.png")
    out = finetune(
        FinetuneConfig(
            references=str(refs), out=str(tmp_path / "out"), classifier="digits-clean",
            denoiser="dds", denoiser_checkpoint=str(denoisers.BUNDLED_DIGITS_DDPM),
            sigmas=[0.25], epochs=2, lr=1e-3, batch_size=10, resolution=8,
        ),
        progress=False,
    )
    weights = out / CLASSIFIER_WEIGHTS
    import classifiers

    names = [str(d) for d in range(10)]
    untuned = classifiers.build_classifier("digits-clean", class_names=names)
    tuned = classifiers.build_classifier("digits-clean", class_names=names, weights=weights)
    images = train.images[:4]
    with torch.no_grad():
        assert not torch.allclose(untuned(images), tuned(images), atol=1e-5)
    result = invoke(certify_command, "--model", "digits-clean",
                    "--classifier-weights", str(weights), "--denoiser", "dds", "--sigma", "0.25",
                    "--n0", "10", "--n", "20", "--max", "2", "--device", "cpu",
                    "--out", str(tmp_path / "cert"), "--quiet", catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "cert.tsv").read_text().splitlines()) == 3


# -- bad input ----------------------------------------------------------------------------


def test_a_reference_folder_without_images_is_refused(clip_config, tmp_path):
    empty = tmp_path / "empty"
    (empty / "dog").mkdir(parents=True)
    (empty / "dog" / "notes.txt").write_text("no image")
    out = tmp_path / "out"
    with pytest.raises(AdaptError, match="holds no images") as caught:
        finetune(clip_config(references=str(empty), out=str(out)), progress=False)
    assert str(empty) in str(caught.value)
    assert not out.exists()


def test_an_out_folder_with_another_runs_weights_is_refused_untouched(clip_config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / CLASSIFIER_WEIGHTS).write_bytes(b"someone else's weights")
    before = snapshot(out)
    with pytest.raises(AdaptError, match="another run") as caught:
        finetune(clip_config(out=str(out)), progress=False)
    assert "--overwrite" in str(caught.value)
    assert snapshot(out) == before


def test_an_out_folder_of_a_run_with_other_settings_is_refused_untouched(clip_config, tmp_path):
    out = finetune(clip_config(epochs=1), progress=False)
    before = snapshot(out)
    with pytest.raises(AdaptError, match=r"other settings \(epochs: 1 -> 2\)"):
        finetune(clip_config(epochs=2), progress=False)
    assert snapshot(out) == before
    # the same settings again: complete, returned as it is
    assert finetune(clip_config(epochs=1), progress=False) == out
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"denoiser": "dds"}, "give the noise levels"),
        ({"sigmas": [0.25, -1.0]}, "every sigma must be a finite number > 0"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"token": "sks"}, "no {} placeholder"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(clip_config, tmp_path, changes,
                                                             message):
    config = clip_config(**changes)
    with pytest.raises(AdaptError, match=message.replace("{", r"\{").replace("}", r"\}")):
        finetune(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_settings_round_trip_as_the_resume_check_compares_them(clip_config):
    from adapt.training import canonical, result_settings

    config = clip_config(sigmas=[0.25, 0.5])
    settings = canonical(result_settings(config))
    assert settings["sigmas"] == [0.25, 0.5] and "device" not in settings
    assert set(settings) <= {f.name for f in dataclasses.fields(FinetuneConfig)}
