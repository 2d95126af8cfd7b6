"""Evaluation datasets of Choi et al. (ECCV 2024, App. A.1), read through torchvision.

Every dataset is opened with torchvision's own class and `download=False`:
nothing is ever downloaded at run time. `data_root` is the folder that
torchvision's `download=True` fills (so `torchvision.datasets.CIFAR10(DATA_ROOT,
download=True)` run once on a machine with network, then copied here, is all a
user needs); a missing dataset raises one `DatasetNotFoundError` that names the
expected path and how to get the data.

Preprocessing follows the paper (after Mao et al., 2023): resize the shorter side
to 256, center crop 224x224; STL-10 is resized to 96x96 instead (its native size);
CIFAR-10 keeps its native 32x32 (the classifiers resize inside their forward).
Images come out as float tensors [3, H, W] in [0, 1], never normalized:
normalization belongs to each classifier's forward.

Splits: `test`, `val`, `train`, mapped per dataset (see `split_names`). ImageNet's
`test` is its public validation set (as in Cohen et al.'s code). Caltech-101,
Caltech-256, SUN397 and EuroSAT have no predefined splits in torchvision: `test` is the
whole set there (the paper subsamples about 500 images for evaluation anyway).

CropDiseases and ISIC, which torchvision lacks, are class-folder trees: `cropdiseases`
reads DATA_ROOT/crop-disease/train/<38 PlantVillage folders> (sorted, as ImageFolder
and the reference code do); `isic` reads DATA_ROOT/isic2018/<code>/ with one folder per
diagnosis column of ISIC 2018 Task 3's ground-truth CSV, labelled in that column order
(`ISIC_CODES`), as the reference code labels them. Their class names and single
templates are the reference code's (robustify-T2I TeCoA/cross_datasets.py).

Class names and CLIP prompt templates (`dataset_class_names`, `dataset_templates`)
need no data on disk:
- ImageNet: open_clip's `IMAGENET_CLASSNAMES` and `OPENAI_IMAGENET_TEMPLATES`.
- pets, flowers102, eurosat, caltech101: the English class names that the
  `clip-benchmark` wheel ships (`clip_benchmark/datasets/en_classnames.json`).
- cifar10, stl10, dtd, food101, sun397, cars: clip-benchmark takes these from
  the dataset files themselves, so they are embedded below (the lists of CLIP's
  `data/prompts.md`), in torchvision's label order; when the data is present the
  loader checks them against torchvision's own class names.
- templates for all but ImageNet: `clip_benchmark/datasets/
  en_zeroshot_classification_templates.json`, with `{c}` written as `{}` (Caltech-256
  takes Caltech-101's; CropDiseases and ISIC the one template of Mao et al.).
- Caltech-256: the names of its category folders ("002.american-flag" -> "american
  flag"), so they need the data on disk.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch

from .registry import DATASETS

RESIZE = 256
CROP = 224
STL_SIZE = 96


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that is not on disk where it was looked for (nothing is downloaded)."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) oddly
        return str(self.args[0]) if self.args else ""


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path


# PIL modes of 16-bit (and 32-bit integer) greyscale files, e.g. 16-bit PNGs.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(path: str) -> Any:
    """Read one image file: a PIL RGB image, or for 16-bit greyscale a [1, H, W] float tensor.

    torchvision's default loader calls PIL's convert("RGB"), which clips 16-bit values at
    255 (nearly every pixel of a 16-bit file turns white); here they are scaled by 65535
    instead. A file that cannot be decoded raises one `UnreadableImageError` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
            if image.mode == "F":  # convert("RGB") would clip floats at 0 and 255
                raise UnreadableImageError(
                    path, "32-bit float pixels (PIL mode F) have no defined range; save the "
                    "image as an 8- or 16-bit PNG"
                )
            if image.mode not in _WIDE_INTEGER_MODES:
                return image.convert("RGB")
            import numpy as np

            values = np.asarray(image).astype(np.int64)
    except UnreadableImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(path, str(error) or type(error).__name__) from error
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UnreadableImageError(
            path, f"integer pixel values {values.min()}..{values.max()} outside the 16-bit range"
        )
    return torch.from_numpy(values.astype(np.float32) / 65535.0).unsqueeze(0)


class ImageDataset(torch.utils.data.Dataset):
    """Indexable (image [C, H, W] float in [0, 1], int label) pairs with readable class names."""

    def __init__(
        self,
        source: Any,
        classes: Sequence[str],
        *,
        name: str,
        split: str,
        templates: Sequence[str] | None = None,
    ):
        self.source = source
        self.classes = list(classes)
        self.name = name
        self.split = split
        self._templates = list(templates) if templates is not None else None

    @property
    def templates(self) -> list[str]:
        """CLIP prompt templates for this dataset, `{}` standing for the class name."""
        if self._templates is None:
            self._templates = dataset_templates(self.name)
        return list(self._templates)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[index]
        # torchvision's v2 transforms return a tv_tensors.Image; hand out a plain tensor.
        return image.as_subclass(torch.Tensor), int(label)

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.classes)} classes)"
        )


def image_transform(size: str = "crop") -> Callable:
    """PIL image -> float tensor in [0, 1].

    `crop`: resize the shorter side to 256, center crop 224; `stl`: 96x96; `native`: as is.
    """
    from torchvision.transforms import v2

    steps: list[Any] = [v2.RGB()]  # grey and CMYK files occur (Caltech-101, ImageNet)
    if size == "crop":
        steps += [v2.Resize(RESIZE), v2.CenterCrop(CROP)]
    elif size == "stl":
        steps += [v2.Resize((STL_SIZE, STL_SIZE))]
    elif size != "native":
        raise ValueError(f"unknown size rule {size!r}; use crop, stl or native")
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


@dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark dataset is found, opened and named."""

    name: str
    title: str
    # What must exist under data_root (torchvision's layout after download=True).
    folder: str
    # Our split name -> keyword arguments for the torchvision class.
    splits: Mapping[str, Mapping[str, Any]]
    num_classes: int
    open: Callable[..., Any]
    size: str = "crop"
    # The torchvision class names are the raw form of ours: check them on load.
    names_follow_torchvision: bool = False
    how_to_get: str = ""
    split_note: str = ""
    # Class names that only the files hold (Caltech-256's category folders): raw -> ours.
    name_from_raw: Callable[[str], str] | None = None


def _torchvision(class_name: str, root: Path, transform: Callable, **kwargs: Any) -> Any:
    import torchvision.datasets

    return getattr(torchvision.datasets, class_name)(
        str(root), transform=transform, download=False, **kwargs
    )


def _open_imagenet(root: Path, transform: Callable, folder: str) -> Any:
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root / "imagenet" / folder), transform=transform, loader=load_image)
    wnid = re.compile(r"n\d{8}")
    if len(dataset.classes) != 1000 or not all(wnid.fullmatch(c) for c in dataset.classes):
        raise ValueError(
            f"{root / 'imagenet' / folder} must hold the 1000 ImageNet classes as folders named "
            f"by WordNet id (n01440764, ...); found {len(dataset.classes)} folders such as "
            f"{dataset.classes[:3]}. {_IMAGENET_HOW}"
        )
    return dataset


def _open_class_folders(
    root: Path, transform: Callable, folder: str, count: int,
    order: Sequence[str] | None = None,
) -> Any:
    """An ImageFolder of `count` class folders under root/folder.

    `order` fixes which folder is which label (ISIC: the ground-truth CSV's column order);
    without it the folders are sorted, as ImageFolder (and the reference code) does.
    """
    from torchvision.datasets import ImageFolder

    path = root / folder
    found = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if order is not None and sorted(order) != found:
        raise ValueError(
            f"{path} must hold exactly the class folders {', '.join(order)}; found "
            f"{', '.join(found) or 'none'}"
        )
    if len(found) != count:
        raise ValueError(f"{path} must hold {count} class folders, found {len(found)}")

    class OrderedImageFolder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            if order is None:
                return super().find_classes(directory)
            return list(order), {name: i for i, name in enumerate(order)}

    return OrderedImageFolder(str(path), transform=transform, loader=load_image)


def _caltech256_name(raw: str) -> str:
    # "001.ak47" -> "ak47", "253.faces-easy-101" -> "faces easy": the folder name without
    # its number and Caltech-101's "-101" mark, hyphens and underscores as spaces (the
    # reference code's rule, robustify-T2I replace/caltech.py).
    name = raw.split(".", 1)[1] if "." in raw else raw
    return " ".join(name.replace("-101", "").replace("_", " ").replace("-", " ").split())


# ISIC 2018 Task 3's diagnosis codes in its ground-truth CSV's column order (the label
# order of the reference code, which takes the argmax over these columns).
ISIC_CODES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

_TV_HOW = (
    "on a machine with network run\n"
    "  python -c \"import torchvision; torchvision.datasets.{call}\"\n"
    "then copy DIR/{top} into {root}/"
)
_IMAGENET_HOW = (
    "ImageNet cannot be downloaded automatically: get ILSVRC2012_img_val.tar and "
    "ILSVRC2012_devkit_t12.tar.gz from image-net.org, put them in {root}/imagenet and run "
    "python -c \"import torchvision; torchvision.datasets.ImageNet('{root}/imagenet', "
    "split='val')\" once: it sorts the images into {root}/imagenet/val/<wnid>/ (the layout "
    "read here)"
)


def _tv_how(call: str, top: str) -> str:
    return _TV_HOW.replace("{call}", call).replace("{top}", top)


_NO_SPLITS = "torchvision's {title} has no predefined splits: `test` reads the whole set"

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "imagenet", "ImageNet-1k (ILSVRC2012)", "imagenet/val",
            {"test": {"folder": "val"}, "val": {"folder": "val"}, "train": {"folder": "train"}},
            1000, _open_imagenet, how_to_get=_IMAGENET_HOW,
            split_note="`test` is the public validation set",
        ),
        BenchmarkSpec(
            "cifar10", "CIFAR-10", "cifar-10-batches-py",
            {"test": {"train": False}, "train": {"train": True}},
            10, partial(_torchvision, "CIFAR10"), size="native", names_follow_torchvision=True,
            how_to_get=_tv_how("CIFAR10('DIR', train=False, download=True)",
                               "cifar-10-batches-py"),
        ),
        BenchmarkSpec(
            "stl10", "STL-10", "stl10_binary",
            {"test": {"split": "test"}, "train": {"split": "train"}},
            10, partial(_torchvision, "STL10"), size="stl", names_follow_torchvision=True,
            how_to_get=_tv_how("STL10('DIR', split='test', download=True)", "stl10_binary"),
        ),
        BenchmarkSpec(
            "food101", "Food-101", "food-101",
            {"test": {"split": "test"}, "train": {"split": "train"}},
            101, partial(_torchvision, "Food101"), names_follow_torchvision=True,
            how_to_get=_tv_how("Food101('DIR', split='test', download=True)", "food-101"),
        ),
        BenchmarkSpec(
            "pets", "Oxford-IIIT Pet", "oxford-iiit-pet",
            {"test": {"split": "test"}, "train": {"split": "trainval"}},
            37, partial(_torchvision, "OxfordIIITPet", target_types="category"),
            names_follow_torchvision=True,
            how_to_get=_tv_how("OxfordIIITPet('DIR', split='test', download=True)",
                               "oxford-iiit-pet"),
            split_note="`train` is torchvision's trainval",
        ),
        BenchmarkSpec(
            "flowers102", "Oxford Flowers-102", "flowers-102",
            {"test": {"split": "test"}, "val": {"split": "val"}, "train": {"split": "train"}},
            102, partial(_torchvision, "Flowers102"),
            how_to_get=_tv_how("Flowers102('DIR', split='test', download=True)",
                               "flowers-102"),
        ),
        BenchmarkSpec(
            "dtd", "Describable Textures (partition 1)", "dtd/dtd",
            {"test": {"split": "test"}, "val": {"split": "val"}, "train": {"split": "train"}},
            47, partial(_torchvision, "DTD", partition=1), names_follow_torchvision=True,
            how_to_get=_tv_how("DTD('DIR', split='test', download=True)", "dtd"),
        ),
        BenchmarkSpec(
            "caltech101", "Caltech-101", "caltech101/101_ObjectCategories",
            {"test": {}}, 101, partial(_torchvision, "Caltech101", target_type="category"),
            how_to_get=_tv_how("Caltech101('DIR', download=True)", "caltech101"),
            split_note=_NO_SPLITS,
        ),
        BenchmarkSpec(
            "sun397", "SUN397", "SUN397",
            {"test": {}}, 397, partial(_torchvision, "SUN397"), names_follow_torchvision=True,
            how_to_get=_tv_how("SUN397('DIR', download=True)", "SUN397"),
            split_note=_NO_SPLITS,
        ),
        BenchmarkSpec(
            "cars", "Stanford Cars", "stanford_cars",
            {"test": {"split": "test"}, "train": {"split": "train"}},
            196, partial(_torchvision, "StanfordCars"), names_follow_torchvision=True,
            how_to_get=(
                "torchvision can no longer download Stanford Cars (its original URL is gone): "
                "get a copy (e.g. a Kaggle mirror) and arrange it as {root}/stanford_cars/ with "
                "devkit/, cars_train/, cars_test/ and cars_test_annos_withlabels.mat, the "
                "layout torchvision.datasets.StanfordCars reads"
            ),
        ),
        BenchmarkSpec(
            "caltech256", "Caltech-256", "caltech256/256_ObjectCategories",
            {"test": {}}, 257, partial(_torchvision, "Caltech256"),
            how_to_get=_tv_how("Caltech256('DIR', download=True)", "caltech256"),
            split_note=_NO_SPLITS, name_from_raw=_caltech256_name,
        ),
        BenchmarkSpec(
            "cropdiseases", "CropDiseases (PlantVillage)", "crop-disease/train",
            {"test": {"folder": "crop-disease/train", "count": 38}}, 38, _open_class_folders,
            how_to_get=(
                "get the PlantVillage images of the CropDiseases benchmark (Mohanty et al. "
                "2016; e.g. the cross-domain few-shot learning benchmark's copy) and put its "
                "38 class folders (Apple___Apple_scab, ..., Tomato___healthy) in "
                "{root}/crop-disease/train/, the layout the reference code reads"
            ),
            split_note="`test` reads crop-disease/train, as the reference code does",
        ),
        BenchmarkSpec(
            "isic", "ISIC 2018 Task 3", "isic2018",
            {"test": {"folder": "isic2018", "count": 7, "order": ISIC_CODES}}, 7,
            _open_class_folders,
            how_to_get=(
                "get ISIC2018_Task3_Training_Input and its GroundTruth CSV from "
                "challenge.isic-archive.com and sort the images into one folder per "
                "diagnosis column of the CSV: {root}/isic2018/"
                + "/, ".join(ISIC_CODES) + "/"
            ),
            split_note="`test` is the Task 3 training set, as in the reference code",
        ),
        BenchmarkSpec(
            "eurosat", "EuroSAT (RGB)", "eurosat/2750",
            {"test": {}}, 10, partial(_torchvision, "EuroSAT"),
            how_to_get=_tv_how("EuroSAT('DIR', download=True)", "eurosat"),
            split_note=_NO_SPLITS,
        ),
    )
}

# Keys of the two clip-benchmark JSON files, where they differ from ours.
_CLIP_BENCHMARK_NAMES = {"pets": "pets", "flowers102": "flowers", "eurosat": "eurosat",
                         "caltech101": "caltech101"}
_CLIP_BENCHMARK_TEMPLATES = {"flowers102": "flowers", "caltech256": "caltech101"}
# No zero-shot templates are published for these but the one of Mao et al. (2023) that
# the reference code uses (robustify-T2I TeCoA/cross_datasets.py).
_EMBEDDED_TEMPLATES = {"cropdiseases": ("A leaf photo of {}.",), "isic": ("A photo of {}.",)}


def split_names(name: str) -> list[str]:
    """The `--split` values dataset `name` accepts."""
    return list(_spec(name).splits)


def dataset_class_names(name: str) -> list[str]:
    """Human-readable class names of dataset `name`, in label order; needs no data on disk.

    For `folder:PATH` the names are the class folders' names (underscores as spaces),
    so that folder must exist.
    """
    if name.startswith("folder:"):
        return _folder_class_names(Path(name[len("folder:") :]).expanduser())
    spec = _spec(name)
    if spec.name_from_raw is not None:
        raise DatasetNotFoundError(
            f"the class names of {spec.title} are its folders' names: they come with the "
            f"data (build_dataset({name!r}, data_root=...)); to get it, "
            + spec.how_to_get.replace("{root}", "DATA_ROOT")
        )
    if spec.name == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    elif spec.name in _EMBEDDED_CLASS_NAMES:
        names = list(_EMBEDDED_CLASS_NAMES[spec.name])
    else:
        names = list(_clip_benchmark_json("en_classnames.json")[_CLIP_BENCHMARK_NAMES[spec.name]])
        if spec.name == "caltech101":
            # clip-benchmark's list follows the sorted category folders *including*
            # BACKGROUND_Google; torchvision's Caltech101 drops that folder, so its label 0
            # is "Faces". Dropping "background" lines the names up with those labels.
            if names[0] != "background":
                raise RuntimeError("unexpected clip-benchmark caltech101 class list")
            names = names[1:]
    if len(names) != spec.num_classes:
        raise RuntimeError(f"{name}: {len(names)} class names, expected {spec.num_classes}")
    return names


def dataset_templates(name: str) -> list[str]:
    """CLIP zero-shot prompt templates for dataset `name`, each with one `{}` for the class.

    ImageNet and `folder:` datasets get the 80 templates of CLIP's ImageNet ensemble.
    """
    if name.startswith("folder:") or _spec(name).name == "imagenet":
        return default_templates()
    if name in _EMBEDDED_TEMPLATES:
        return list(_EMBEDDED_TEMPLATES[name])
    key = _CLIP_BENCHMARK_TEMPLATES.get(name, name)
    templates = _clip_benchmark_json("en_zeroshot_classification_templates.json")[key]
    return [_placeholder(t) for t in templates]


def default_templates() -> list[str]:
    """open_clip's copy of CLIP's 80 ImageNet prompt templates, as `{}` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip stores them as functions of the class name; render them with "{}".
    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def build_benchmark(name: str, split: str = "test", data_root: str | os.PathLike | None = None,
                    ) -> ImageDataset:
    """Open benchmark dataset `name` under `data_root` (never downloads)."""
    spec = _spec(name)
    if split not in spec.splits:
        note = f" ({spec.split_note.format(title=spec.title)})" if spec.split_note else ""
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; available: "
            f"{', '.join(spec.splits)}{note}"
        )
    if data_root is None or str(data_root) == "":
        raise DatasetNotFoundError(
            f"dataset {name!r} ({spec.title}) needs a data root (--data-root DATA_ROOT): "
            f"the folder that holds {spec.folder}/ in torchvision's layout. To get the data, "
            + spec.how_to_get.replace("{root}", "DATA_ROOT")
        )
    root = Path(data_root).expanduser()
    expected = root / spec.folder
    if spec.name == "imagenet":
        expected = root / "imagenet" / spec.splits[split]["folder"]
    if not expected.exists():
        raise DatasetNotFoundError(_missing_message(spec, expected, root))
    transform = image_transform(spec.size)
    try:
        source = spec.open(root, transform, **spec.splits[split])
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise DatasetNotFoundError(
            _missing_message(spec, expected, root) + f"\n(torchvision: {error})"
        ) from error
    except FileNotFoundError as error:  # e.g. a split list or annotation file is absent
        raise DatasetNotFoundError(
            _missing_message(spec, expected, root) + f"\n({error})"
        ) from error
    raw = getattr(source, "classes", None) or getattr(source, "categories", None)
    if spec.name_from_raw is not None:
        classes = [spec.name_from_raw(c) for c in raw]
        if len(classes) != spec.num_classes:
            raise ValueError(
                f"{expected}: torchvision finds {len(classes)} classes for {spec.name!r}, "
                f"expected {spec.num_classes}; the files are incomplete or not {spec.title}"
            )
    else:
        classes = dataset_class_names(name)
    if raw is not None and spec.name != "imagenet":
        _check_class_names(spec, list(raw), classes, expected)
    return ImageDataset(source, classes, name=name, split=split)


def build_folder(path: str, split: str = "test", data_root: str | os.PathLike | None = None,
                 ) -> ImageDataset:
    """An ImageFolder at `path` (class = subfolder, underscores read as spaces).

    `split` is not used: point PATH at the split's own folder. A relative PATH is
    read from the working directory.
    """
    folder = Path(path).expanduser()
    classes = _folder_class_names(folder)
    from torchvision.datasets import ImageFolder

    source = ImageFolder(str(folder), transform=image_transform("crop"), loader=load_image)
    return ImageDataset(source, classes, name=f"folder:{path}", split=split)


def _folder_class_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder not found: {folder} (expected {folder}/<class name>/<image files>)"
        )
    from torchvision.datasets.folder import find_classes

    try:
        raw, _ = find_classes(str(folder))
    except FileNotFoundError as error:
        raise DatasetNotFoundError(
            f"{folder} has no class folders (expected {folder}/<class name>/<image files>)"
        ) from error
    return [c.replace("_", " ") for c in raw]


def _missing_message(spec: BenchmarkSpec, expected: Path, root: Path) -> str:
    return (
        f"dataset {spec.name!r} ({spec.title}) not found: expected {expected} under data root "
        f"{root}. Nothing is downloaded automatically; to get it, "
        + spec.how_to_get.replace("{root}", str(root))
    )


def _check_class_names(
    spec: BenchmarkSpec, raw: list[str], ours: list[str], where: Path
) -> None:
    """Our names must be one per torchvision label; where they are the same words, in order."""
    if len(raw) != len(ours):
        raise ValueError(
            f"{where}: torchvision finds {len(raw)} classes for {spec.name!r}, expected "
            f"{len(ours)}; the files are incomplete or not {spec.title}"
        )
    if not spec.names_follow_torchvision:
        return

    def words(text: str) -> str:
        return " ".join(re.sub(r"[_/\-]", " ", text).lower().split())

    pairs = enumerate(zip(raw, ours, strict=True))
    differing = [(i, a, b) for i, (a, b) in pairs if words(a) != words(b)]
    if differing:
        shown = "; ".join(f"label {i}: {a!r} vs {b!r}" for i, a, b in differing[:5])
        warnings.warn(
            f"{spec.name}: {len(differing)} class names differ from torchvision's ({shown}); "
            "check that labels and names still line up",
            stacklevel=3,
        )


def _spec(name: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name]
    except KeyError:
        known = ", ".join(sorted(BENCHMARKS)) + ", folder:PATH"
        raise ValueError(f"unknown dataset {name!r}; known: {known}") from None


def _placeholder(template: str) -> str:
    # clip-benchmark writes the class slot as "{c}"; ours is "{}".
    template = template.replace("{c}", "{}")
    if template.count("{}") != 1:
        raise RuntimeError(f"template without exactly one class slot: {template!r}")
    return template


@cache
def _clip_benchmark_json(filename: str) -> dict[str, list[str]]:
    try:
        from importlib.resources import files

        text = (files("clip_benchmark.datasets") / filename).read_text(encoding="utf-8")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "class names and prompt templates come from the clip-benchmark package: "
            "pip install 'robustify[models]' (or clip-benchmark)"
        ) from error
    return json.loads(text)


def _register() -> None:
    for spec in BENCHMARKS.values():
        kind = "class folders" if spec.open is _open_class_folders else "torchvision"
        DATASETS.register(spec.name, f"{spec.title}: {kind}, data root required")(
            partial(build_benchmark, spec.name)
        )
    DATASETS.register("folder:", "an ImageFolder at PATH: one subfolder per class")(
        build_folder
    )


_register()


# Class names in torchvision's label order for the datasets whose names
# clip-benchmark reads from the data files. Source: the class lists of CLIP's
# `data/prompts.md` (github.com/openai/CLIP, MIT license); SUN397's are its
# category paths with "_" and "/" read as spaces, Food-101's its folder names
# with "_" as spaces, as clip-benchmark derives them.
_EMBEDDED_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    # The reference code's names (robustify-T2I TeCoA/cross_datasets.py), in the order of
    # the sorted PlantVillage folders (CropDiseases) and of ISIC_CODES.
    "cropdiseases": (
        "Apple Scab", "Apple Black Rot", "Apple Cedar Rust", "Apple healthy",
        "Blueberry healthy", "Cherry Powdery Mildew", "Cherry healthy", "Corn Gray Leaf Spot",
        "Corn Common Rust", "Corn Northern Leaf Blight", "Corn healthy", "Grape Black Rot",
        "Grape Black Measles (Esca)", "Grape Leaf Blight", "Grape Healthy",
        "Orange Huanglongbing (Citrus Greening)", "Peach Bacterial Spot", "Peach healthy",
        "Bell Pepper Bacterial Spot", "Bell Pepper healthy", "Potato Early Blight",
        "Potato Late Blight", "Potato healthy", "Raspberry healthy", "Soybean healthy",
        "Squash Powdery Mildew", "Strawberry Leaf Scorch", "Strawberry Healthy",
        "Tomato Bacterial Spot", "Tomato Early Blight", "Tomato Late Blight",
        "Tomato Leaf Mold", "Tomato Septoria Leaf Spot", "Tomato Two Spotted Spider Mite",
        "Tomato Target Spot", "Tomato Yellow Leaf Curl Virus", "Tomato Mosaic Virus",
        "Tomato healthy",
    ),
    "isic": (
        "Melanoma", "Melanocytic nevus", "Basal cell carcinoma", "Actinic keratosis",
        "Benign keratosis", "Dermatofibroma", "Vascular lesion",
    ),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ),
    "stl10": (
        "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
    ),
    "dtd": (
        "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
        "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly",
        "gauzy", "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined",
        "marbled", "matted", "meshed", "paisley", "perforated", "pitted", "pleated",
        "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled",
        "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
        "wrinkled", "zigzagged",
    ),
    "food101": (
        "apple pie", "baby back ribs", "baklava", "beef carpaccio", "beef tartare", "beet salad",
        "beignets", "bibimbap", "bread pudding", "breakfast burrito", "bruschetta", "caesar salad",
        "cannoli", "caprese salad", "carrot cake", "ceviche", "cheese plate", "cheesecake",
        "chicken curry", "chicken quesadilla", "chicken wings", "chocolate cake",
        "chocolate mousse", "churros", "clam chowder", "club sandwich", "crab cakes",
        "creme brulee", "croque madame", "cup cakes", "deviled eggs", "donuts", "dumplings",
        "edamame", "eggs benedict", "escargots", "falafel", "filet mignon", "fish and chips",
        "foie gras", "french fries", "french onion soup", "french toast", "fried calamari",
        "fried rice", "frozen yogurt", "garlic bread", "gnocchi", "greek salad",
        "grilled cheese sandwich", "grilled salmon", "guacamole", "gyoza", "hamburger",
        "hot and sour soup", "hot dog", "huevos rancheros", "hummus", "ice cream", "lasagna",
        "lobster bisque", "lobster roll sandwich", "macaroni and cheese", "macarons", "miso soup",
        "mussels", "nachos", "omelette", "onion rings", "oysters", "pad thai", "paella",
        "pancakes", "panna cotta", "peking duck", "pho", "pizza", "pork chop", "poutine",
        "prime rib", "pulled pork sandwich", "ramen", "ravioli", "red velvet cake", "risotto",
        "samosa", "sashimi", "scallops", "seaweed salad", "shrimp and grits",
        "spaghetti bolognese", "spaghetti carbonara", "spring rolls", "steak",
        "strawberry shortcake", "sushi", "tacos", "takoyaki", "tiramisu", "tuna tartare",
        "waffles",
    ),
    "sun397": (
        "abbey", "airplane cabin", "airport terminal", "alley", "amphitheater", "amusement arcade",
        "amusement park", "anechoic chamber", "apartment building outdoor", "apse indoor",
        "aquarium", "aqueduct", "arch", "archive", "arrival gate outdoor", "art gallery",
        "art school", "art studio", "assembly line", "athletic field outdoor", "atrium public",
        "attic", "auditorium", "auto factory", "badlands", "badminton court indoor",
        "baggage claim", "bakery shop", "balcony exterior", "balcony interior", "ball pit",
        "ballroom", "bamboo forest", "banquet hall", "bar", "barn", "barndoor", "baseball field",
        "basement", "basilica", "basketball court outdoor", "bathroom", "batters box", "bayou",
        "bazaar indoor", "bazaar outdoor", "beach", "beauty salon", "bedroom", "berth",
        "biology laboratory", "bistro indoor", "boardwalk", "boat deck", "boathouse", "bookstore",
        "booth indoor", "botanical garden", "bow window indoor", "bow window outdoor",
        "bowling alley", "boxing ring", "brewery indoor", "bridge", "building facade", "bullring",
        "burial chamber", "bus interior", "butchers shop", "butte", "cabin outdoor", "cafeteria",
        "campsite", "campus", "canal natural", "canal urban", "candy store", "canyon",
        "car interior backseat", "car interior frontseat", "carrousel", "casino indoor", "castle",
        "catacomb", "cathedral indoor", "cathedral outdoor", "cavern indoor", "cemetery", "chalet",
        "cheese factory", "chemistry lab", "chicken coop indoor", "chicken coop outdoor",
        "childs room", "church indoor", "church outdoor", "classroom", "clean room", "cliff",
        "cloister indoor", "closet", "clothing store", "coast", "cockpit", "coffee shop",
        "computer room", "conference center", "conference room", "construction site",
        "control room", "control tower outdoor", "corn field", "corral", "corridor",
        "cottage garden", "courthouse", "courtroom", "courtyard", "covered bridge exterior",
        "creek", "crevasse", "crosswalk", "cubicle office", "dam", "delicatessen",
        "dentists office", "desert sand", "desert vegetation", "diner indoor", "diner outdoor",
        "dinette home", "dinette vehicle", "dining car", "dining room", "discotheque", "dock",
        "doorway outdoor", "dorm room", "driveway", "driving range outdoor", "drugstore",
        "electrical substation", "elevator door", "elevator interior", "elevator shaft",
        "engine room", "escalator indoor", "excavation", "factory indoor", "fairway",
        "fastfood restaurant", "field cultivated", "field wild", "fire escape", "fire station",
        "firing range indoor", "fishpond", "florist shop indoor", "food court", "forest broadleaf",
        "forest needleleaf", "forest path", "forest road", "formal garden", "fountain", "galley",
        "game room", "garage indoor", "garbage dump", "gas station", "gazebo exterior",
        "general store indoor", "general store outdoor", "gift shop", "golf course",
        "greenhouse indoor", "greenhouse outdoor", "gymnasium indoor", "hangar indoor",
        "hangar outdoor", "harbor", "hayfield", "heliport", "herb garden", "highway", "hill",
        "home office", "hospital", "hospital room", "hot spring", "hot tub outdoor",
        "hotel outdoor", "hotel room", "house", "hunting lodge outdoor", "ice cream parlor",
        "ice floe", "ice shelf", "ice skating rink indoor", "ice skating rink outdoor", "iceberg",
        "igloo", "industrial area", "inn outdoor", "islet", "jacuzzi indoor", "jail cell",
        "jail indoor", "jewelry shop", "kasbah", "kennel indoor", "kennel outdoor",
        "kindergarden classroom", "kitchen", "kitchenette", "labyrinth outdoor", "lake natural",
        "landfill", "landing deck", "laundromat", "lecture room", "library indoor",
        "library outdoor", "lido deck outdoor", "lift bridge", "lighthouse", "limousine interior",
        "living room", "lobby", "lock chamber", "locker room", "mansion", "manufactured home",
        "market indoor", "market outdoor", "marsh", "martial arts gym", "mausoleum", "medina",
        "moat water", "monastery outdoor", "mosque indoor", "mosque outdoor", "motel", "mountain",
        "mountain snowy", "movie theater indoor", "museum indoor", "music store", "music studio",
        "nuclear power plant outdoor", "nursery", "oast house", "observatory outdoor", "ocean",
        "office", "office building", "oil refinery outdoor", "oilrig", "operating room", "orchard",
        "outhouse outdoor", "pagoda", "palace", "pantry", "park", "parking garage indoor",
        "parking garage outdoor", "parking lot", "parlor", "pasture", "patio", "pavilion",
        "pharmacy", "phone booth", "physics laboratory", "picnic area", "pilothouse indoor",
        "planetarium outdoor", "playground", "playroom", "plaza", "podium indoor",
        "podium outdoor", "pond", "poolroom establishment", "poolroom home", "power plant outdoor",
        "promenade deck", "pub indoor", "pulpit", "putting green", "racecourse", "raceway", "raft",
        "railroad track", "rainforest", "reception", "recreation room", "residential neighborhood",
        "restaurant", "restaurant kitchen", "restaurant patio", "rice paddy", "riding arena",
        "river", "rock arch", "rope bridge", "ruin", "runway", "sandbar", "sandbox", "sauna",
        "schoolhouse", "sea cliff", "server room", "shed", "shoe shop", "shopfront",
        "shopping mall indoor", "shower", "skatepark", "ski lodge", "ski resort", "ski slope",
        "sky", "skyscraper", "slum", "snowfield", "squash court", "stable", "stadium baseball",
        "stadium football", "stage indoor", "staircase", "street", "subway interior",
        "subway station platform", "supermarket", "sushi bar", "swamp", "swimming pool indoor",
        "swimming pool outdoor", "synagogue indoor", "synagogue outdoor", "television studio",
        "temple east asia", "temple south asia", "tennis court indoor", "tennis court outdoor",
        "tent outdoor", "theater indoor procenium", "theater indoor seats", "thriftshop",
        "throne room", "ticket booth", "toll plaza", "topiary garden", "tower", "toyshop",
        "track outdoor", "train railway", "train station platform", "tree farm", "tree house",
        "trench", "underwater coral reef", "utility room", "valley", "van interior",
        "vegetable garden", "veranda", "veterinarians office", "viaduct", "videostore", "village",
        "vineyard", "volcano", "volleyball court indoor", "volleyball court outdoor",
        "waiting room", "warehouse indoor", "water tower", "waterfall block", "waterfall fan",
        "waterfall plunge", "watering hole", "wave", "wet bar", "wheat field", "wind farm",
        "windmill", "wine cellar barrel storage", "wine cellar bottle storage",
        "wrestling ring indoor", "yard", "youth hostel",
    ),
    "cars": (
        "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
        "Acura TL Type-S 2008", "Acura TSX Sedan 2012", "Acura Integra Type R 2001",
        "Acura ZDX Hatchback 2012", "Aston Martin V8 Vantage Convertible 2012",
        "Aston Martin V8 Vantage Coupe 2012", "Aston Martin Virage Convertible 2012",
        "Aston Martin Virage Coupe 2012", "Audi RS 4 Convertible 2008", "Audi A5 Coupe 2012",
        "Audi TTS Coupe 2012", "Audi R8 Coupe 2012", "Audi V8 Sedan 1994", "Audi 100 Sedan 1994",
        "Audi 100 Wagon 1994", "Audi TT Hatchback 2011", "Audi S6 Sedan 2011",
        "Audi S5 Convertible 2012", "Audi S5 Coupe 2012", "Audi S4 Sedan 2012",
        "Audi S4 Sedan 2007", "Audi TT RS Coupe 2012", "BMW ActiveHybrid 5 Sedan 2012",
        "BMW 1 Series Convertible 2012", "BMW 1 Series Coupe 2012", "BMW 3 Series Sedan 2012",
        "BMW 3 Series Wagon 2012", "BMW 6 Series Convertible 2007", "BMW X5 SUV 2007",
        "BMW X6 SUV 2012", "BMW M3 Coupe 2012", "BMW M5 Sedan 2010", "BMW M6 Convertible 2010",
        "BMW X3 SUV 2012", "BMW Z4 Convertible 2012",
        "Bentley Continental Supersports Conv. Convertible 2012", "Bentley Arnage Sedan 2009",
        "Bentley Mulsanne Sedan 2011", "Bentley Continental GT Coupe 2012",
        "Bentley Continental GT Coupe 2007", "Bentley Continental Flying Spur Sedan 2007",
        "Bugatti Veyron 16.4 Convertible 2009", "Bugatti Veyron 16.4 Coupe 2009",
        "Buick Regal GS 2012", "Buick Rainier SUV 2007", "Buick Verano Sedan 2012",
        "Buick Enclave SUV 2012", "Cadillac CTS-V Sedan 2012", "Cadillac SRX SUV 2012",
        "Cadillac Escalade EXT Crew Cab 2007", "Chevrolet Silverado 1500 Hybrid Crew Cab 2012",
        "Chevrolet Corvette Convertible 2012", "Chevrolet Corvette ZR1 2012",
        "Chevrolet Corvette Ron Fellows Edition Z06 2007", "Chevrolet Traverse SUV 2012",
        "Chevrolet Camaro Convertible 2012", "Chevrolet HHR SS 2010",
        "Chevrolet Impala Sedan 2007", "Chevrolet Tahoe Hybrid SUV 2012",
        "Chevrolet Sonic Sedan 2012", "Chevrolet Express Cargo Van 2007",
        "Chevrolet Avalanche Crew Cab 2012", "Chevrolet Cobalt SS 2010",
        "Chevrolet Malibu Hybrid Sedan 2010", "Chevrolet TrailBlazer SS 2009",
        "Chevrolet Silverado 2500HD Regular Cab 2012",
        "Chevrolet Silverado 1500 Classic Extended Cab 2007", "Chevrolet Express Van 2007",
        "Chevrolet Monte Carlo Coupe 2007", "Chevrolet Malibu Sedan 2007",
        "Chevrolet Silverado 1500 Extended Cab 2012", "Chevrolet Silverado 1500 Regular Cab 2012",
        "Chrysler Aspen SUV 2009", "Chrysler Sebring Convertible 2010",
        "Chrysler Town and Country Minivan 2012", "Chrysler 300 SRT-8 2010",
        "Chrysler Crossfire Convertible 2008", "Chrysler PT Cruiser Convertible 2008",
        "Daewoo Nubira Wagon 2002", "Dodge Caliber Wagon 2012", "Dodge Caliber Wagon 2007",
        "Dodge Caravan Minivan 1997", "Dodge Ram Pickup 3500 Crew Cab 2010",
        "Dodge Ram Pickup 3500 Quad Cab 2009", "Dodge Sprinter Cargo Van 2009",
        "Dodge Journey SUV 2012", "Dodge Dakota Crew Cab 2010", "Dodge Dakota Club Cab 2007",
        "Dodge Magnum Wagon 2008", "Dodge Challenger SRT8 2011", "Dodge Durango SUV 2012",
        "Dodge Durango SUV 2007", "Dodge Charger Sedan 2012", "Dodge Charger SRT-8 2009",
        "Eagle Talon Hatchback 1998", "FIAT 500 Abarth 2012", "FIAT 500 Convertible 2012",
        "Ferrari FF Coupe 2012", "Ferrari California Convertible 2012",
        "Ferrari 458 Italia Convertible 2012", "Ferrari 458 Italia Coupe 2012",
        "Fisker Karma Sedan 2012", "Ford F-450 Super Duty Crew Cab 2012",
        "Ford Mustang Convertible 2007", "Ford Freestar Minivan 2007",
        "Ford Expedition EL SUV 2009", "Ford Edge SUV 2012", "Ford Ranger SuperCab 2011",
        "Ford GT Coupe 2006", "Ford F-150 Regular Cab 2012", "Ford F-150 Regular Cab 2007",
        "Ford Focus Sedan 2007", "Ford E-Series Wagon Van 2012", "Ford Fiesta Sedan 2012",
        "GMC Terrain SUV 2012", "GMC Savana Van 2012", "GMC Yukon Hybrid SUV 2012",
        "GMC Acadia SUV 2012", "GMC Canyon Extended Cab 2012", "Geo Metro Convertible 1993",
        "HUMMER H3T Crew Cab 2010", "HUMMER H2 SUT Crew Cab 2009", "Honda Odyssey Minivan 2012",
        "Honda Odyssey Minivan 2007", "Honda Accord Coupe 2012", "Honda Accord Sedan 2012",
        "Hyundai Veloster Hatchback 2012", "Hyundai Santa Fe SUV 2012", "Hyundai Tucson SUV 2012",
        "Hyundai Veracruz SUV 2012", "Hyundai Sonata Hybrid Sedan 2012",
        "Hyundai Elantra Sedan 2007", "Hyundai Accent Sedan 2012", "Hyundai Genesis Sedan 2012",
        "Hyundai Sonata Sedan 2012", "Hyundai Elantra Touring Hatchback 2012",
        "Hyundai Azera Sedan 2012", "Infiniti G Coupe IPL 2012", "Infiniti QX56 SUV 2011",
        "Isuzu Ascender SUV 2008", "Jaguar XK XKR 2012", "Jeep Patriot SUV 2012",
        "Jeep Wrangler SUV 2012", "Jeep Liberty SUV 2012", "Jeep Grand Cherokee SUV 2012",
        "Jeep Compass SUV 2012", "Lamborghini Reventon Coupe 2008",
        "Lamborghini Aventador Coupe 2012", "Lamborghini Gallardo LP 570-4 Superleggera 2012",
        "Lamborghini Diablo Coupe 2001", "Land Rover Range Rover SUV 2012",
        "Land Rover LR2 SUV 2012", "Lincoln Town Car Sedan 2011",
        "MINI Cooper Roadster Convertible 2012", "Maybach Landaulet Convertible 2012",
        "Mazda Tribute SUV 2011", "McLaren MP4-12C Coupe 2012",
        "Mercedes-Benz 300-Class Convertible 1993", "Mercedes-Benz C-Class Sedan 2012",
        "Mercedes-Benz SL-Class Coupe 2009", "Mercedes-Benz E-Class Sedan 2012",
        "Mercedes-Benz S-Class Sedan 2012", "Mercedes-Benz Sprinter Van 2012",
        "Mitsubishi Lancer Sedan 2012", "Nissan Leaf Hatchback 2012",
        "Nissan NV Passenger Van 2012", "Nissan Juke Hatchback 2012", "Nissan 240SX Coupe 1998",
        "Plymouth Neon Coupe 1999", "Porsche Panamera Sedan 2012",
        "Ram C/V Cargo Van Minivan 2012", "Rolls-Royce Phantom Drophead Coupe Convertible 2012",
        "Rolls-Royce Ghost Sedan 2012", "Rolls-Royce Phantom Sedan 2012",
        "Scion xD Hatchback 2012", "Spyker C8 Convertible 2009", "Spyker C8 Coupe 2009",
        "Suzuki Aerio Sedan 2007", "Suzuki Kizashi Sedan 2012", "Suzuki SX4 Hatchback 2012",
        "Suzuki SX4 Sedan 2012", "Tesla Model S Sedan 2012", "Toyota Sequoia SUV 2012",
        "Toyota Camry Sedan 2012", "Toyota Corolla Sedan 2012", "Toyota 4Runner SUV 2012",
        "Volkswagen Golf Hatchback 2012", "Volkswagen Golf Hatchback 1991",
        "Volkswagen Beetle Hatchback 2012", "Volvo C30 Hatchback 2012", "Volvo 240 Sedan 1993",
        "Volvo XC90 SUV 2007", "smart fortwo Convertible 2012",
    ),
}
