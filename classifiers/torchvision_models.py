"""ImageNet classifiers from torchvision's model zoo: `resnet50` (paper App. A.2), `resnet18`.

Default weights are `IMAGENET1K_V1` (76.1% / 69.8% top-1): the original
torchvision checkpoints that the denoised-smoothing literature (Salman et al.,
2020; Carlini et al., 2023) used as "ImageNet pre-trained ResNet-50". `V2`
(80.9%, ResNet-50 only) is one option away: `pretrained="IMAGENET1K_V2"`.

The forward normalizes [0, 1] inputs with the mean/std of the weights' own
evaluation transforms (`weights.transforms()`), and does not resize: ResNets
pool globally, so the dataset's preprocessing decides the input size.

A network with ImageNet weights predicts the 1000 ImageNet classes, so the task
must have exactly 1000 class names. Weights fine-tuned for another label set
(`weights=PATH`, a state dict of the torchvision model) bring their own head: the
network is then built with `len(class_names)` outputs and the file must fit it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .registry import CLASSIFIERS
from .weights_io import WeightsNotFoundError, load_classifier_weights

# Our name -> (torchvision constructor, weights enum).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "resnet50": ("resnet50", "ResNet50_Weights"),
    "resnet18": ("resnet18", "ResNet18_Weights"),
}
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
IMAGENET_CLASSES = 1000


class ClassCountError(ValueError):
    """The task's class names do not match the classifier's output head."""


class NormalizedClassifier(torch.nn.Module):
    """`model((x - mean) / std)`: a network trained on normalized inputs, fed [0, 1] images."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        # Not persistent: the state dict stays the torchvision model's own (under "model.").
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def build_torchvision(
    name: str,
    *,
    class_names: Sequence[str],
    sigma: float | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_WEIGHTS,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> NormalizedClassifier:
    """Build torchvision classifier `name` (resnet50, resnet18) for these class names.

    Args:
        class_names: one name per label; 1000 (ImageNet) unless `weights` are given.
        sigma: unused; accepted for the registry.
        pretrained: a weights enum member name ("IMAGENET1K_V1", "IMAGENET1K_V2",
            "DEFAULT"), a local state-dict file of the same ImageNet network (e.g. a
            copy of torchvision's download), or None for random initialization.
        weights: fine-tuned weights for this network with `len(class_names)` outputs;
            replaces `pretrained` entirely.
        device: where the model runs.
    """
    del sigma
    import torchvision.models

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown torchvision model {name!r}; known: {', '.join(ARCHITECTURES)}")
    constructor_name, enum_name = ARCHITECTURES[name]
    constructor = getattr(torchvision.models, constructor_name)
    weights_enum = getattr(torchvision.models, enum_name)
    num_classes = len(class_names)

    weight_files = None  # the files the weights come from, for the result's sha256
    if weights is not None:
        model = constructor(weights=None, num_classes=num_classes)
        load_classifier_weights(model, weights)
        weight_files = [Path(weights).expanduser()]
    else:
        if num_classes != IMAGENET_CLASSES:
            raise ClassCountError(
                f"{name} with ImageNet weights predicts the {IMAGENET_CLASSES} ImageNet-1k "
                f"classes, but the task has {num_classes} class names. Use a zero-shot model "
                f"(clip-b32, ...) for another label set, or pass weights=PATH (fine-tuned "
                f"weights whose head has {num_classes} outputs)."
            )
        model = constructor(weights=None, num_classes=IMAGENET_CLASSES)
        if pretrained is not None:
            weight_files = [_load_pretrained(name, model, weights_enum, pretrained)]

    # Normalization constants come from the weights' evaluation transforms; all ImageNet
    # members share them, so random and fine-tuned networks use the default member's.
    member = (
        weights_enum[str(pretrained)]
        if isinstance(pretrained, str) and pretrained in weights_enum.__members__
        else weights_enum[DEFAULT_WEIGHTS]
    )
    preset = member.transforms()
    classifier = NormalizedClassifier(model, preset.mean, preset.std)
    classifier.weight_files = weight_files
    return classifier.to(device).eval()


def _load_pretrained(
    name: str, model: torch.nn.Module, weights_enum: Any, pretrained: str | os.PathLike
) -> Path:
    """Load ImageNet weights named by a weights enum member, or from a local file; return
    the file they were read from."""
    text = str(pretrained)
    if text in weights_enum.__members__:
        member = weights_enum[text]
        # where torch.hub keeps (and get_state_dict reads) the member's download
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
        try:
            # torch.hub caches under $TORCH_HOME/hub/checkpoints; its loader defaults to
            # weights_only=False, so ask for True; check_hash checks a download's sha256.
            state = member.get_state_dict(
                progress=False, check_hash=True, map_location="cpu", weights_only=True
            )
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise WeightsNotFoundError(
                f"{name}: torchvision weights {weights_enum.__name__}.{text} are not on this "
                f"machine and cannot be downloaded ({error}). On a machine with network "
                f"download {member.url} and copy it to {target}, or pass the file with "
                f"--classifier-weights PATH (builder option weights=PATH or pretrained=PATH)."
            ) from error
        model.load_state_dict(state)
        return target
    path = Path(text).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{name}: {text!r} is neither a weights name of {weights_enum.__name__} "
            f"({', '.join(weights_enum.__members__)}) nor an existing file"
        )
    load_classifier_weights(model, path)
    return path


def _register() -> None:
    for model_name, (constructor_name, _) in ARCHITECTURES.items():
        CLASSIFIERS.register(
            model_name, f"torchvision {constructor_name}, ImageNet-1k weights ({DEFAULT_WEIGHTS})"
        )(partial(build_torchvision, model_name))


_register()
