"""`imagenet-samples`: 20 labelled ImageNet validation images that ship inside `foolbox`.

foolbox (MIT) keeps them as package data, `foolbox/data/imagenet_{index}_{label}.jpg`
(index 00-19, label the ImageNet-1k class index); the files are found through the
wheel's list of installed files (`importlib.metadata`), so foolbox itself is never
imported. It is in the project's `imagenet-demo` extra.

Preprocessing: resize the shorter side to 224, center crop 224 x 224, float tensors in
[0, 1], no normalization. That is EfficientNet-Lite0's own input size and the resize of
its package's documented example (`transforms.Resize(image_size)`); 19 of the images are
512 x 512, so the crop only touches the one that is not square. Class names are
open_clip's ImageNet-1k names, in label order, so CLIP models can run on it too.

Twenty images measure little: one image is 5 points of accuracy. They are here to run
real weights through the project's own paths, not to benchmark.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .datasets import DatasetNotFoundError, ImageDataset, default_templates
from .registry import DATASETS

DISTRIBUTION = "foolbox"
IMAGE_SIZE = 224
NUM_IMAGES = 20
_FILE_NAME = re.compile(r"imagenet_(\d{2})_(\d+)\.jpg")
_HOW_TO_GET = (
    "install the project's imagenet-demo extra (pip install -c constraints.txt "
    "'.[imagenet-demo]'), which brings foolbox and its 20 ImageNet sample images"
)


def sample_image_files() -> list[tuple[Path, int]]:
    """(path, ImageNet label) of foolbox's 20 ImageNet images, in foolbox's index order."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise DatasetNotFoundError(
            f"imagenet-samples: {DISTRIBUTION} is not installed; {_HOW_TO_GET}"
        ) from None
    found: dict[int, tuple[Path, int]] = {}
    for file in files:
        match = _FILE_NAME.fullmatch(file.name)
        if match and file.parent.name == "data":
            found[int(match.group(1))] = (Path(file.locate()), int(match.group(2)))
    if sorted(found) != list(range(NUM_IMAGES)) or not all(p.is_file() for p, _ in found.values()):
        raise DatasetNotFoundError(
            f"imagenet-samples: expected {NUM_IMAGES} files foolbox/data/imagenet_NN_LABEL.jpg "
            f"in the installed {DISTRIBUTION}, found {len(found)}; {_HOW_TO_GET}"
        )
    return [found[index] for index in range(NUM_IMAGES)]


def sample_transform() -> Callable:
    """PIL image -> [3, 224, 224] float tensor in [0, 1] (shorter side 224, center crop)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RGB(), v2.Resize(IMAGE_SIZE), v2.CenterCrop(IMAGE_SIZE),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
    ])


class _SampleFiles(torch.utils.data.Dataset):
    """(PIL image through `transform`, label) for a list of (path, label)."""

    def __init__(self, files: Sequence[tuple[Path, int]], transform: Callable):
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.files[index]
        with Image.open(path) as image:
            return self.transform(image), label


@DATASETS.register(
    "imagenet-samples", "20 labelled ImageNet validation images shipped by foolbox (offline)"
)
def build_imagenet_samples(split: str = "test", data_root: str | None = None) -> ImageDataset:
    """foolbox's 20 ImageNet validation images; `data_root` is ignored (they ship in a wheel)."""
    del data_root
    if split != "test":
        raise ValueError(f"dataset 'imagenet-samples' has only the split 'test', not {split!r}")
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    source = _SampleFiles(sample_image_files(), sample_transform())
    return ImageDataset(
        source, list(IMAGENET_CLASSNAMES), name="imagenet-samples", split=split,
        templates=default_templates(),
    )
