"""Checkpoints of Cohen et al. (2019) and Salman et al. (2019): `--model cohen:PATH`.

Both repositories (locuslab/smoothing, Hadisalman/smoothing-adversarial) save
`torch.save({"epoch", "arch", "state_dict", "optimizer"})`, where `state_dict` is
that of `Sequential(NormalizeLayer, network)`: the normalization layer holds its
constants as plain tensors (no keys), so the network's keys start with `1.`, and
the ImageNet ResNet-50 was wrapped in `DataParallel` (`1.module.`). The file is
read with `torch.load(weights_only=True)`; the network is rebuilt from `arch`:

| arch                   | network                      | classes | normalization |
| ---------------------- | ---------------------------- | ------- | ------------- |
| `resnet50`             | torchvision ResNet-50        | 1000    | ImageNet      |
| `cifar_resnet20`/`110` | CIFAR ResNet (`CifarResNet`) | 10      | CIFAR-10      |
| `imagenet32_resnet110` | CIFAR ResNet, 1000 outputs   | 1000    | CIFAR-10 (Salman's) |

Noise is added in [0, 1] pixel space and normalization is the model's first layer,
as in those repositories, so their sigma is ours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import CLASSIFIERS
from .torchvision_models import ClassCountError, NormalizedClassifier
from .weights_io import WeightsMismatchError, WeightsNotFoundError, load_torch_file

# The constants of their datasets.py (the mean/std their models were trained with).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class CheckpointError(ValueError):
    """A file that is not a checkpoint of these repositories, or of an unknown arch."""


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1-projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, Sec. 4.2) with depth 6n + 2 and projection shortcuts.

    Written here (torchvision has only the ImageNet ResNets) with the module names of
    the implementation Cohen et al. and Salman et al. trained, so their state dicts load
    as they are: conv1/bn1, layer1-3 of n blocks at 16/32/64 channels, 8x8 average
    pooling, fc.
    """

    def __init__(self, depth: int = 110, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 56, 110, ...), not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet50(num_classes: int) -> nn.Module:
    import torchvision.models

    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


# arch -> (network constructor, classes, (mean, std))
ARCHITECTURES: dict[str, tuple[Any, int, tuple[Sequence[float], Sequence[float]]]] = {
    "resnet50": (_resnet50, 1000, (IMAGENET_MEAN, IMAGENET_STD)),
    "cifar_resnet20": (lambda k: CifarResNet(20, k), 10, (CIFAR10_MEAN, CIFAR10_STD)),
    "cifar_resnet110": (lambda k: CifarResNet(110, k), 10, (CIFAR10_MEAN, CIFAR10_STD)),
    "imagenet32_resnet110": (lambda k: CifarResNet(110, k), 1000, (CIFAR10_MEAN, CIFAR10_STD)),
}


def read_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """The `arch` and the network's own state dict (prefixes `1.` and `module.` removed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"cohen:{path}: no such file")
    loaded = load_torch_file(
        path, CheckpointError, what="cohen:",
        expected="expected a checkpoint saved by Cohen et al.'s or Salman et al.'s train.py",
    )
    if not (isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping)
            and isinstance(loaded.get("arch"), str)):
        found = sorted(loaded)[:8] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise CheckpointError(
            f"cohen:{path} is not a checkpoint of Cohen et al.'s format (a dict with 'arch' "
            f"and 'state_dict'); found {found}"
        )
    arch = loaded["arch"]
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"cohen:{path} has arch {arch!r}; known: {', '.join(ARCHITECTURES)}"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in loaded["state_dict"].items():
        if not key.startswith("1."):
            # their NormalizeLayer keeps its constants as plain attributes: nothing else
            # should come before the network
            raise CheckpointError(
                f"cohen:{path}: key {key!r} is not under '1.' (the network after the "
                "normalization layer); is this a checkpoint of another code base?"
            )
        key = key.removeprefix("1.").removeprefix("module.")
        state[key] = value
    return arch, state


def build_cohen(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str],
    sigma: float | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> NormalizedClassifier:
    """Rebuild a Cohen et al. / Salman et al. checkpoint as a [0, 1]-input classifier.

    Args:
        path: the `.pth.tar` file their training script wrote.
        class_names: the task's classes; their number must be the checkpoint's outputs.
        sigma: unused (their checkpoints are trained at one noise level, named in their path).
        weights: refused: the checkpoint holds the whole network already.
        device: where the model runs.
    """
    del sigma
    if weights is not None:
        raise ValueError("--classifier-weights does not apply to cohen:PATH; the checkpoint "
                         "is the whole model")
    arch, state = read_checkpoint(path)
    constructor, num_classes, (mean, std) = ARCHITECTURES[arch]
    if len(class_names) != num_classes:
        raise ClassCountError(
            f"cohen:{path} ({arch}) predicts {num_classes} classes, but the dataset has "
            f"{len(class_names)}"
        )
    network = constructor(num_classes)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(
            f"cohen:{path} does not fit arch {arch}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {misshaped[:5]}"
        )
    network.load_state_dict(state, strict=True)
    classifier = NormalizedClassifier(network, mean, std)
    classifier.weight_files = [Path(path).expanduser()]  # the CLI records their sha256
    return classifier.to(device).eval()


CLASSIFIERS.register(
    "cohen:", "a checkpoint of Cohen et al. / Salman et al. (resnet50, cifar_resnet110)"
)(build_cohen)
