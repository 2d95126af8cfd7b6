"""`adapt.lgap_finetune` (seed 001, Sec. 3.2): a classifier fine-tuned on LGAP-purified clean
images, with the tiny BLIP and Stable Diffusion of tests/tiny_purifier_models_lgap.py and a
tiny torchvision ResNet-18 (tests/tiny_classifiers.py).

Known answer: what the classifier is trained on is LGAP's purification of the batch's
clean images, each with its own generator, computed here independently image by image.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adapt.lgap_finetune as lgap_finetune_module
from adapt.errors import AdaptError
from adapt.finetune import CLASSIFIER_WEIGHTS, CONFIG_NAME
from adapt.lgap_finetune import LGAPFinetuneConfig, lgap_finetune, purification_generator
from adapt.references import load_reference_set
from adapt.training import stream_batch
from denoisers.purifiers.lgap import LGAPPurifier, load_purifier
from denoisers.registry import CheckpointError
from tests.tiny_classifiers import save_tiny_resnet, write_reference_set
from tests.tiny_models import one_thread
from tests.tiny_purifier_models_lgap import save_tiny_blip, save_tiny_sd

CLASSES = ["dog", "cat"]

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lgap_finetune")
    return {
        "blip": save_tiny_blip(folder / "blip"),
        "sd": save_tiny_sd(folder / "sd"),
        "resnet": save_tiny_resnet(folder / "resnet.safetensors", len(CLASSES)),
        "references": write_reference_set(folder / "refs", CLASSES, shots=2, size=16),
    }


def config(tiny, out, **changes) -> LGAPFinetuneConfig:
    settings = dict(
        references=str(tiny["references"]), out=str(out), classifier="resnet18",
        classifier_options={"weights": str(tiny["resnet"])},
        caption_checkpoint=str(tiny["blip"]), ldm_checkpoint=str(tiny["sd"]),
        num_inference_steps=4, purify_resolution=None, epochs=2, batch_size=2,
        denoise_batch_size=2, checkpoint_every=0,
    )
    settings.update(changes)
    return LGAPFinetuneConfig(**settings)


def test_the_classifier_trains_on_lgaps_purification_of_each_clean_image(
    tiny, tmp_path, monkeypatch
):
    seen = []
    original = lgap_finetune_module.classifier_logits

    def spy(classifier, images, *args):
        seen.append(images.detach().clone())
        return original(classifier, images, *args)

    monkeypatch.setattr(lgap_finetune_module, "classifier_logits", spy)
    purified = []
    purify = LGAPPurifier.purify

    def count(self, x, *args, **kwargs):
        purified.append(x.shape[0])
        return purify(self, x, *args, **kwargs)

    monkeypatch.setattr(LGAPPurifier, "purify", count)
    settings = config(tiny, tmp_path / "out")
    out = lgap_finetune(settings, progress=False)
    assert len(seen) == 4  # 4 images, batches of 2, 2 epochs
    assert sum(purified) == 4  # each image purified once, kept for the second epoch
    monkeypatch.setattr(LGAPPurifier, "purify", purify)

    # Here: each image of the first two batches purified alone with its own generator.
    purifier, _ = load_purifier(**settings.purifier_options())
    references = load_reference_set(tiny["references"])
    for step in (0, 2):  # the first batch of each epoch
        indices = stream_batch(settings.seed, step, 2, len(references))
        expected = torch.cat([
            purifier.purify(references[i][0][None], [purification_generator(settings.seed, i)])
            for i in indices
        ])
        torch.testing.assert_close(seen[step], expected, rtol=0, atol=1e-6)
        clean = torch.stack([references[i][0] for i in indices])
        assert not torch.allclose(seen[step], clean, atol=1e-3)

    record = json.loads((out / CONFIG_NAME).read_text())
    assert record["kind"] == "lgap-finetune" and record["status"] == "complete"
    assert record["purifier"]["strength"] == 0.5
    assert record["settings"]["epochs"] == 2 and record["settings"]["lr"] == 1e-3
    log = (out / "loss_log.tsv").read_text().splitlines()
    assert len(log) == 1 + 4


def test_the_tuned_weights_differ_and_reload_as_the_classifier(tiny, tmp_path, monkeypatch):
    import classifiers

    monkeypatch.chdir(tiny["sd"].parent)  # LGAP's checkpoints given as relative folders
    relative = config(tiny, tmp_path / "out", epochs=1, caption_checkpoint="blip",
                      ldm_checkpoint="sd")
    out = lgap_finetune(relative, progress=False)
    tuned = load_file(str(out / CLASSIFIER_WEIGHTS))
    untuned = load_file(str(tiny["resnet"]))
    assert any(not torch.equal(tuned[k], untuned[k]) for k in untuned if k.endswith("weight"))
    before = classifiers.build_classifier("resnet18", class_names=CLASSES,
                                          weights=str(tiny["resnet"])).eval()
    after = classifiers.build_classifier("resnet18", class_names=CLASSES,
                                         weights=str(out / CLASSIFIER_WEIGHTS)).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(before(x), after(x))
    # The settings name the folders themselves: from elsewhere, with absolute paths, the
    # finished run is recognized, returned at once and left unchanged.
    settings = json.loads((out / CONFIG_NAME).read_text())["settings"]
    assert settings["ldm_checkpoint"] == str(tiny["sd"].resolve())
    monkeypatch.chdir(tmp_path)
    stamp = (out / CLASSIFIER_WEIGHTS).stat().st_mtime_ns
    assert lgap_finetune(config(tiny, tmp_path / "out", epochs=1), progress=False) == out
    assert (out / CLASSIFIER_WEIGHTS).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("changes,message", [
    ({"epochs": 0}, "epochs"),
    ({"strength": 0.0}, "strength"),
    ({"lr": -1.0}, "lr"),
    ({"lr_scheduler": "bogus"}, "lr_scheduler"),
])
def test_bad_settings_are_refused_before_anything_is_written(tiny, tmp_path, changes, message):
    with pytest.raises(AdaptError, match=message):
        lgap_finetune(config(tiny, tmp_path / "out", **changes), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_missing_ldm_is_one_checkpoint_error_and_nothing_is_written(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="latent diffusion model"):
        lgap_finetune(config(tiny, tmp_path / "out", ldm_checkpoint=str(tmp_path / "none")),
                      progress=False)
    assert not (tmp_path / "out").exists()
