"""torchvision classifiers and the weights files they (and CLIP) load.

Networks are built with random initialization (`pretrained=None`) through the same
builder a user calls, saved to safetensors and loaded back with `weights=PATH`.
"""

from __future__ import annotations

import urllib.error

import pytest
import torch

from classifiers.registry import CLASSIFIERS, build_classifier
from classifiers.torchvision_models import ClassCountError, NormalizedClassifier
from classifiers.weights_io import (
    WeightsMismatchError,
    WeightsNotFoundError,
    load_classifier_weights,
    read_state_dict,
    save_classifier_weights,
)

IMAGENET_NAMES = [f"class {i}" for i in range(1000)]
# torchvision's ImageNet normalization (known values, not read from the code under test)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_resnet18(seed: int, class_names=IMAGENET_NAMES, **options):
    torch.manual_seed(seed)
    return build_classifier(
        "resnet18", class_names=class_names, sigma=0.5, pretrained=None, **options
    )


def test_registered_names():
    assert "resnet50" in CLASSIFIERS and "resnet18" in CLASSIFIERS


def test_forward_normalizes_with_imagenet_statistics():
    classifier = random_resnet18(seed=0)
    assert isinstance(classifier, NormalizedClassifier) and not classifier.training
    x = images()
    with torch.no_grad():
        logits = classifier(x)
        expected = classifier.model((x - MEAN) / STD)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_weights_round_trip_through_safetensors(tmp_path):
    original = random_resnet18(seed=0)
    path = save_classifier_weights(original.model, tmp_path / "resnet18.safetensors")
    loaded = build_classifier("resnet18", class_names=IMAGENET_NAMES, weights=path)
    different = random_resnet18(seed=1)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)
        assert not torch.allclose(different(x), original(x), atol=1e-3)


def test_pretrained_file_loads_with_weights_only(tmp_path):
    original = random_resnet18(seed=2)
    path = tmp_path / "resnet18-local.pth"
    torch.save(original.model.state_dict(), path)  # a plain state dict, as torchvision ships
    loaded = build_classifier("resnet18", class_names=IMAGENET_NAMES, pretrained=str(path))
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


def test_imagenet_head_needs_1000_class_names():
    with pytest.raises(ClassCountError) as caught:
        build_classifier("resnet50", class_names=["cat", "dog"], pretrained=None)
    assert "1000" in str(caught.value) and "2 class names" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_fine_tuned_weights_bring_their_own_head(tmp_path):
    names = [f"breed {i}" for i in range(10)]
    torch.manual_seed(3)
    import torchvision

    tuned = torchvision.models.resnet18(num_classes=10).eval()
    path = save_classifier_weights(tuned, tmp_path / "tuned.safetensors")
    classifier = build_classifier("resnet18", class_names=names, weights=path)
    x = images(3)
    with torch.no_grad():
        logits = classifier(x)
        torch.testing.assert_close(logits, tuned((x - MEAN) / STD), rtol=0, atol=0)
    assert logits.shape == (2, 10)

    imagenet_head = save_classifier_weights(
        random_resnet18(seed=4).model, tmp_path / "imagenet.safetensors"
    )
    with pytest.raises(WeightsMismatchError, match=r"fc\.weight: file \(1000, 512\) vs model"):
        build_classifier("resnet18", class_names=names, weights=imagenet_head)


def offline(url, dst, *args, **kwargs):
    raise urllib.error.URLError("no network")


def test_pretrained_name_reads_the_torch_hub_cache(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached = random_resnet18(seed=7)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached.model.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/")[-1])
    loaded = build_classifier("resnet18", class_names=IMAGENET_NAMES)  # IMAGENET1K_V1
    x = images(7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cached(x), rtol=0, atol=0)


def test_missing_pretrained_weights_give_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsNotFoundError) as caught:
        build_classifier("resnet50", class_names=IMAGENET_NAMES)
    message = str(caught.value)
    assert "resnet50" in message and "ResNet50_Weights.IMAGENET1K_V1" in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    with pytest.raises(WeightsNotFoundError, match="nor an existing file"):
        build_classifier("resnet50", class_names=IMAGENET_NAMES, pretrained="IMAGENET9K_V9")


# -- weights_io ---------------------------------------------------------------------------


def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_strict_loading_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    state = small_net().state_dict()
    state.pop("2.bias")
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 4)
    save_file(state, str(path))
    with pytest.raises(WeightsMismatchError) as caught:
        load_classifier_weights(small_net(), path)
    message = str(caught.value)
    assert "missing keys (1): 2.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "0.weight: file (5, 4) vs model (3, 4)" in message


def test_prefixed_keys_get_a_hint(tmp_path):
    wrapper = torch.nn.Module()
    wrapper.model = small_net()
    path = save_classifier_weights(wrapper, tmp_path / "wrapped.safetensors")
    with pytest.raises(WeightsMismatchError, match="starts with 'model.'"):
        load_classifier_weights(small_net(), path)


def test_torch_files_load_only_plain_tensors(tmp_path):
    source = small_net(seed=5)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict()}, wrapped)
    target = load_classifier_weights(small_net(seed=6), wrapped)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)

    pickled = tmp_path / "pickled.pt"
    torch.save({"weight": torch.zeros(1), "object": small_net()}, pickled)
    with pytest.raises(WeightsMismatchError, match="weights_only=True"):
        read_state_dict(pickled)

    with pytest.raises(WeightsMismatchError, match="unknown weights format"):
        (tmp_path / "w.npz").write_bytes(b"")
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(WeightsNotFoundError):
        read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        save_classifier_weights(source, tmp_path / "w.pt")
