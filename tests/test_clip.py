"""CLIP zero-shot classifiers, on a tiny open_clip model of the real CLIP class.

The tiny model (ViT, width 64, 2 layers, 32x32 images; text width 64, context 77,
the bundled BPE vocabulary) is registered as an open_clip config, created with
random weights, saved as safetensors and loaded back through the builder path a
user takes with a local checkpoint (`pretrained=PATH`). Expected logits are
computed by hand from the *original* model, so loading, preprocessing and the
zero-shot head are all checked against something the classifier did not compute.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from classifiers.clip import CLIPZeroShotClassifier, build_clip  # noqa: E402
from classifiers.registry import CLASSIFIERS, build_classifier  # noqa: E402
from classifiers.weights_io import (  # noqa: E402
    WeightsMismatchError,
    WeightsNotFoundError,
    save_classifier_weights,
)

TINY_ARCH = "robustify-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ["golden retriever", "tabby cat", "sports car"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}"]


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # QuickGELU as in OpenAI's CLIP (the builder forces it for the OpenAI models).
    return open_clip.create_model(TINY_ARCH, pretrained=None, force_quick_gelu=True).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference model, its checkpoint path, a second model's checkpoint path)."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    config = folder / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    reference = tiny_model(seed=0)
    other = tiny_model(seed=1)
    return (
        reference,
        save_classifier_weights(reference, folder / "tiny_clip.safetensors"),
        other,
        save_classifier_weights(other, folder / "tiny_clip_finetuned.safetensors"),
    )


def build(checkpoint, cache_dir, **options):
    options.setdefault("templates", TEMPLATES)
    options.setdefault("class_names", CLASSES)
    return build_classifier(
        "clip-b32", sigma=0.25, pretrained=checkpoint, arch=TINY_ARCH, cache_dir=cache_dir,
        **options,
    )


@torch.no_grad()
def hand_logits(model, images, class_names=CLASSES, templates=TEMPLATES):
    """CLIP's zero-shot head written out: normalize, average templates, renormalize, scale."""
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    mean = torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.constants.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    rows = []
    for name in class_names:
        text = model.encode_text(tokenizer([t.format(name) for t in templates]))
        text = text / text.norm(dim=-1, keepdim=True)
        mean_text = text.mean(dim=0)
        rows.append(mean_text / mean_text.norm())
    weights = torch.stack(rows)
    image = model.encode_image((images - mean) / std)
    image = image / image.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image @ weights.T


@pytest.fixture
def count_text_calls(monkeypatch):
    calls = []
    original = open_clip.model.CLIP.encode_text

    def counting(self, text, normalize=False):
        calls.append(len(text))
        return original(self, text, normalize=normalize)

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", counting)
    return calls


def test_registered_names():
    for name in ("clip-b32", "clip-b16", "clip-l14"):
        assert name in CLASSIFIERS


def test_logits_are_clip_zero_shot_head_computed_by_hand(tiny, tmp_path):
    reference, checkpoint, _, _ = tiny
    classifier = build(checkpoint, tmp_path)
    assert isinstance(classifier, CLIPZeroShotClassifier)
    assert not classifier.training
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = classifier(images)
    assert logits.shape == (4, len(CLASSES))
    torch.testing.assert_close(logits, hand_logits(reference, images), rtol=1e-5, atol=1e-5)
    assert classifier.class_embeddings.shape == (len(CLASSES), TINY_CONFIG["embed_dim"])
    torch.testing.assert_close(
        classifier.class_embeddings.norm(dim=-1), torch.ones(len(CLASSES)), rtol=0, atol=1e-6
    )


def test_inputs_of_another_size_are_resized_bicubic_antialiased(tiny, tmp_path):
    reference, checkpoint, _, _ = tiny
    classifier = build(checkpoint, tmp_path)
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    resized = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True)
    with torch.no_grad():
        logits = classifier(images)
    torch.testing.assert_close(logits, hand_logits(reference, resized), rtol=1e-5, atol=1e-5)


def test_text_embeddings_are_cached_per_classes_and_templates(tiny, tmp_path, count_text_calls):
    _, checkpoint, _, _ = tiny
    first = build(checkpoint, tmp_path)
    assert sum(count_text_calls) == len(CLASSES) * len(TEMPLATES)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    count_text_calls.clear()
    second = build(checkpoint, tmp_path)
    assert count_text_calls == []  # served from the cache
    torch.testing.assert_close(second.class_embeddings, first.class_embeddings, rtol=0, atol=0)

    build(checkpoint, tmp_path, class_names=CLASSES[:2] + ["pickup truck"])
    assert sum(count_text_calls) == len(CLASSES) * len(TEMPLATES)

    count_text_calls.clear()
    build(checkpoint, tmp_path, templates=TEMPLATES[:2])
    assert sum(count_text_calls) == len(CLASSES) * 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_fine_tuned_weights_change_the_output(tiny, tmp_path, count_text_calls):
    reference, checkpoint, other, other_checkpoint = tiny
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    base = build(checkpoint, tmp_path)
    count_text_calls.clear()
    tuned = build(checkpoint, tmp_path, weights=other_checkpoint)
    assert count_text_calls, "new text weights must not reuse the cached embeddings"
    with torch.no_grad():
        base_logits, tuned_logits = base(images), tuned(images)
    torch.testing.assert_close(tuned_logits, hand_logits(other, images), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)


def test_rebuild_follows_the_current_text_encoder(tiny, tmp_path):
    _, checkpoint, _, _ = tiny
    classifier = build(checkpoint, tmp_path)
    before = classifier.class_embeddings.clone()
    with torch.no_grad():
        classifier.model.text_projection.mul_(-1.5)  # what a fine-tuning step might do
    classifier.rebuild_class_embeddings()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = classifier(images)
    torch.testing.assert_close(logits, hand_logits(classifier.model, images), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(classifier.class_embeddings, before, atol=1e-3)


def test_class_embeddings_with_gradients_reach_the_text_encoder(tiny, tmp_path):
    _, checkpoint, _, _ = tiny
    classifier = build(checkpoint, tmp_path)
    embeddings = classifier.compute_class_embeddings(grad=True)
    torch.testing.assert_close(embeddings.detach(), classifier.class_embeddings, rtol=0, atol=1e-6)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    loss = F.cross_entropy(classifier(images, embeddings), torch.tensor([0, 2]))
    loss.backward()
    assert classifier.model.text_projection.grad is not None
    assert classifier.model.text_projection.grad.abs().sum() > 0


def test_missing_hub_weights_give_one_clear_error(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as caught:
        # Fails while fetching, before ViT-B-32 is instantiated.
        build_classifier("clip-b32", class_names=CLASSES, cache_dir=tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    for expected in ("clip-b32", "ViT-B-32", "'openai'", "--clip-checkpoint",
                     "timm/vit_base_patch32_clip_224.openai"):
        assert expected in message


def test_missing_or_wrong_local_checkpoint(tiny, tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsNotFoundError, match="absent.safetensors"):
        build(missing, tmp_path)
    foreign = tmp_path / "foreign.safetensors"
    save_classifier_weights(torch.nn.Linear(3, 2), foreign)
    with pytest.raises(WeightsMismatchError, match=TINY_ARCH):
        build(foreign, tmp_path)
    with pytest.raises(WeightsMismatchError, match="missing keys"):
        build(tiny[1], tmp_path, weights=foreign)


def test_templates_need_one_slot(tiny, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build(tiny[1], tmp_path, templates=["a photo"])
    # clip-benchmark's "{c}" spelling is accepted
    classifier = build(tiny[1], tmp_path, templates=["a photo of a {c}."])
    assert classifier.templates == ["a photo of a {}."]


def test_default_templates_are_clips_imagenet_ensemble(tiny, tmp_path):
    classifier = build_clip(
        "clip-b32", class_names=CLASSES[:1], pretrained=tiny[1], arch=TINY_ARCH,
        cache_dir=tmp_path,
    )
    assert len(classifier.templates) == 80
    assert "a photo of a {}." in classifier.templates
