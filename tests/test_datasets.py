"""Benchmark datasets: class names and templates without data, loaders on tiny fakes.

Datasets whose on-disk format is an image folder tree (ImageFolder, EuroSAT, DTD,
ImageNet's val/<wnid>/) are faked with small PNG files in tmp_path and read through
torchvision's own classes; for the others the missing-data error is checked.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from classifiers.datasets import (
    BENCHMARKS,
    DatasetNotFoundError,
    dataset_class_names,
    dataset_templates,
    image_transform,
    split_names,
)
from classifiers.registry import DATASETS, build_dataset

# Class counts of the benchmarks (Choi et al. App. A.1 and the datasets' papers).
EXPECTED_CLASSES = {
    "imagenet": 1000, "cifar10": 10, "stl10": 10, "food101": 101, "pets": 37,
    "flowers102": 102, "dtd": 47, "caltech101": 101, "sun397": 397, "cars": 196,
    "eurosat": 10, "caltech256": 257, "cropdiseases": 38, "isic": 7,
}
# Caltech-256's names are its category folders' names: they come with the data.
NAMES_FROM_DATA = {"caltech256"}
COLOR = (255, 0, 128)  # a uniform image keeps its exact value through resize and crop
COLOR_TENSOR = torch.tensor([1.0, 0.0, 128 / 255]).view(3, 1, 1)


def write_png(path, size=(300, 260), color=COLOR, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 90).save(path)


def assert_preprocessed(image: torch.Tensor, side: int = 224) -> None:
    assert image.dtype == torch.float32 and type(image) is torch.Tensor
    assert image.shape == (3, side, side)
    assert image.min() >= 0 and image.max() <= 1


def test_every_benchmark_is_registered_with_names_and_templates():
    assert set(BENCHMARKS) == set(EXPECTED_CLASSES)
    assert "folder:/some/path" in DATASETS
    for name, count in EXPECTED_CLASSES.items():
        assert name in DATASETS
        if name in NAMES_FROM_DATA:
            with pytest.raises(DatasetNotFoundError, match="folders' names.*data_root"):
                dataset_class_names(name)
            assert dataset_templates(name)
            continue
        names = dataset_class_names(name)
        assert len(names) == count, name
        repeated = sorted({n for n in names if names.count(n) > 1})
        # CLIP's cleaned ImageNet names merge two pairs of classes (projectile/missile,
        # sunglass/sunglasses); every other list is duplicate-free.
        assert repeated == (["missile", "sunglasses"] if name == "imagenet" else []), name
        assert all(isinstance(n, str) and n.strip() == n and n for n in names), name
        templates = dataset_templates(name)
        assert templates, name
        for template in templates:
            assert template.count("{}") == 1 and "{c}" not in template, (name, template)
            assert template.format("dog") != template


def test_known_names_and_templates():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    assert dataset_class_names("imagenet") == list(IMAGENET_CLASSNAMES)
    assert len(dataset_templates("imagenet")) == 80  # CLIP's ImageNet ensemble
    assert open_clip is not None
    cifar = dataset_class_names("cifar10")
    assert cifar[0] == "airplane" and cifar[9] == "truck"
    assert dataset_class_names("stl10")[7] == "monkey"
    assert dataset_templates("food101") == ["a photo of {}, a type of food."]
    # torchvision's Caltech101 drops BACKGROUND_Google; its label 0 is "Faces",
    # and the sorted folders continue Faces_easy, Leopards, Motorbikes, accordion.
    caltech = dataset_class_names("caltech101")
    assert "background" not in caltech
    assert caltech[:5] == ["off-center face", "centered face", "leopard", "motorbike", "accordion"]


@pytest.mark.parametrize(
    "name, folder, hint",
    [
        ("cifar10", "cifar-10-batches-py", "CIFAR10('DIR', train=False, download=True)"),
        ("stl10", "stl10_binary", "STL10("),
        ("food101", "food-101", "Food101("),
        ("pets", "oxford-iiit-pet", "OxfordIIITPet("),
        ("flowers102", "flowers-102", "Flowers102("),
        ("dtd", "dtd/dtd", "DTD("),
        ("caltech101", "caltech101/101_ObjectCategories", "Caltech101("),
        ("sun397", "SUN397", "SUN397("),
        ("cars", "stanford_cars", "can no longer download"),
        ("eurosat", "eurosat/2750", "EuroSAT("),
        ("imagenet", "imagenet/val", "image-net.org"),
        ("caltech256", "caltech256/256_ObjectCategories", "Caltech256("),
        ("cropdiseases", "crop-disease/train", "PlantVillage"),
        ("isic", "isic2018", "ISIC2018_Task3_Training_Input"),
    ],
)
def test_missing_data_gives_one_clear_error_and_downloads_nothing(tmp_path, name, folder, hint):
    with pytest.raises(DatasetNotFoundError) as caught:
        build_dataset(name, split="test", data_root=str(tmp_path))
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert str(tmp_path / folder) in message
    assert hint in message
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded


def test_missing_data_root_is_a_clear_error():
    with pytest.raises(DatasetNotFoundError, match="needs a data root.*--data-root"):
        build_dataset("cifar10", split="test", data_root=None)


def test_splits_are_mapped_per_dataset(tmp_path):
    assert split_names("imagenet") == ["test", "val", "train"]
    assert split_names("cifar10") == ["test", "train"]
    assert split_names("sun397") == ["test"]
    with pytest.raises(ValueError, match="no split 'val'; available: test, train"):
        build_dataset("cifar10", split="val", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="no predefined splits"):
        build_dataset("eurosat", split="train", data_root=str(tmp_path))


def test_image_folder(tmp_path):
    root = tmp_path / "pets"
    write_png(root / "golden_retriever" / "a.png", size=(300, 260))
    write_png(root / "golden_retriever" / "b.png", size=(64, 80))
    write_png(root / "tabby_cat" / "c.png", size=(500, 240), mode="L")  # grey file
    dataset = build_dataset(f"folder:{root}", split="test")
    assert dataset.classes == ["golden retriever", "tabby cat"]
    assert dataset_class_names(f"folder:{root}") == dataset.classes
    assert len(dataset) == 3
    labels = []
    for index in range(3):
        image, label = dataset[index]
        assert_preprocessed(image)
        labels.append(label)
    assert labels == [0, 0, 1]
    torch.testing.assert_close(dataset[0][0], COLOR_TENSOR.expand(3, 224, 224))
    grey = dataset[2][0]
    torch.testing.assert_close(grey[0], grey[1])  # grey replicated into three channels
    assert len(dataset.templates) == 80

    with pytest.raises(DatasetNotFoundError, match="image folder not found"):
        build_dataset(f"folder:{tmp_path / 'absent'}", split="test")


def test_fake_eurosat_through_torchvision(tmp_path):
    raw = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake"]  # EuroSAT's folder names
    for folder in raw:
        write_png(tmp_path / "eurosat" / "2750" / folder / f"{folder}_1.png", size=(64, 64))
    dataset = build_dataset("eurosat", split="test", data_root=str(tmp_path))
    assert dataset.classes == dataset_class_names("eurosat")
    assert len(dataset) == 10
    image, label = dataset[1]
    assert_preprocessed(image)
    torch.testing.assert_close(image, COLOR_TENSOR.expand(3, 224, 224))
    assert dataset.classes[label] == "forest"
    assert dataset.classes[dataset[9][1]] == "lake or sea"


def fake_dtd(root, classes):
    base = root / "dtd" / "dtd"
    lines = []
    for cls in classes:
        write_png(base / "images" / cls / f"{cls}_0001.png", size=(320, 300))
        lines.append(f"{cls}/{cls}_0001.png")
    for split in ("train", "val", "test"):
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def test_fake_dtd_checks_names_against_torchvision(tmp_path):
    names = dataset_class_names("dtd")
    fake_dtd(tmp_path / "good", names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching names: no warning
        dataset = build_dataset("dtd", split="test", data_root=str(tmp_path / "good"))
    assert len(dataset) == 47 and dataset.classes == names
    image, label = dataset[names.index("polka-dotted")]
    assert_preprocessed(image)
    assert dataset.classes[label] == "polka-dotted"

    renamed = [("stripy" if n == "striped" else n) for n in names]  # same sorted place
    fake_dtd(tmp_path / "renamed", renamed)
    with pytest.warns(UserWarning, match="1 class names differ.*label 39: .stripy. vs .striped."):
        build_dataset("dtd", split="test", data_root=str(tmp_path / "renamed"))

    fake_dtd(tmp_path / "short", names[:-1])
    with pytest.raises(ValueError, match="finds 46 classes"):
        build_dataset("dtd", split="test", data_root=str(tmp_path / "short"))


def test_fake_imagenet_val_folder(tmp_path):
    val = tmp_path / "imagenet" / "val"
    wnids = [f"n{10000000 + 37 * i:08d}" for i in range(1000)]  # sorted like real wnids
    for wnid in wnids:
        write_png(val / wnid / "ILSVRC2012_val_0.png", size=(8, 8))
    dataset = build_dataset("imagenet", split="test", data_root=str(tmp_path))
    assert len(dataset) == 1000 and dataset.classes == dataset_class_names("imagenet")
    image, label = dataset[0]
    assert label == 0 and dataset.classes[0] == "tench"
    assert_preprocessed(image)
    with pytest.raises(DatasetNotFoundError, match="imagenet/train"):
        build_dataset("imagenet", split="train", data_root=str(tmp_path))

    (tmp_path / "bad" / "imagenet" / "val" / "flat").mkdir(parents=True)
    write_png(tmp_path / "bad" / "imagenet" / "val" / "flat" / "x.png")
    with pytest.raises(ValueError, match="1000 ImageNet classes"):
        build_dataset("imagenet", split="val", data_root=str(tmp_path / "bad"))


def test_size_rules_for_stl_and_cifar():
    stl = image_transform("stl")(Image.new("RGB", (96, 96), COLOR))
    assert tuple(stl.shape) == (3, 96, 96)
    cifar = image_transform("native")(Image.new("RGB", (32, 32), COLOR))
    assert tuple(cifar.shape) == (3, 32, 32)
    torch.testing.assert_close(cifar.as_subclass(torch.Tensor), COLOR_TENSOR.expand(3, 32, 32))
    assert BENCHMARKS["stl10"].size == "stl" and BENCHMARKS["cifar10"].size == "native"


CALTECH256_FOLDERS = ["001.ak47", "002.american-flag", "251.airplanes-101",
                      "253.faces-easy-101", "257.clutter"]


def fake_caltech256(root, folders=CALTECH256_FOLDERS, per_class=2, size=(40, 30)):
    """torchvision's Caltech256 layout: caltech256/256_ObjectCategories/NNN.name/NNN_MMMM.jpg."""
    base = root / "caltech256" / "256_ObjectCategories"
    for folder in folders:
        number = int(folder.split(".")[0])
        for j in range(1, per_class + 1):
            path = base / folder / f"{number:03d}_{j:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, COLOR).save(path, quality=100)
    return base


def test_fake_caltech256_through_torchvision(tmp_path, monkeypatch):
    import classifiers.datasets as datasets

    # 5 of the 257 folders keep the fake small; the class count is checked below.
    monkeypatch.setitem(BENCHMARKS, "caltech256", dataclasses.replace(
        BENCHMARKS["caltech256"], num_classes=len(CALTECH256_FOLDERS)))
    fake_caltech256(tmp_path)
    dataset = datasets.build_benchmark("caltech256", split="test", data_root=str(tmp_path))
    assert dataset.classes == ["ak47", "american flag", "airplanes", "faces easy", "clutter"]
    assert len(dataset) == 10
    image, label = dataset[3]
    assert label == 1
    assert_preprocessed(image)
    assert len(dataset.templates) == len(dataset_templates("caltech101"))


def test_caltech256_with_missing_classes_is_refused(tmp_path):
    fake_caltech256(tmp_path)  # 5 folders, not 257
    with pytest.raises(ValueError, match="finds 5 classes for 'caltech256', expected 257"):
        build_dataset("caltech256", split="test", data_root=str(tmp_path))


def test_cropdiseases_folders_get_the_reference_names_in_sorted_order(tmp_path):
    folders = [f"Crop{i:02d}___disease" for i in range(38)]
    for i, folder in enumerate(reversed(folders)):  # creation order must not matter
        write_png(tmp_path / "crop-disease" / "train" / folder / f"{i}.png", size=(50, 40))
    dataset = build_dataset("cropdiseases", split="test", data_root=str(tmp_path))
    assert dataset.classes == dataset_class_names("cropdiseases")
    assert dataset.classes[0] == "Apple Scab" and dataset.classes[37] == "Tomato healthy"
    assert len(dataset) == 38
    image, label = dataset[5]
    assert label == 5  # sorted folder 5 holds one image
    assert_preprocessed(image)
    assert dataset.templates == ["A leaf photo of {}."]

    (tmp_path / "crop-disease" / "train" / "extra").mkdir()
    with pytest.raises(ValueError, match="38 class folders, found 39"):
        build_dataset("cropdiseases", split="test", data_root=str(tmp_path))


def test_isic_folders_follow_the_ground_truth_columns(tmp_path):
    from classifiers.datasets import ISIC_CODES

    assert ISIC_CODES == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    for code in sorted(ISIC_CODES):
        write_png(tmp_path / "isic2018" / code / f"ISIC_{code}.png", size=(60, 45))
    dataset = build_dataset("isic", split="test", data_root=str(tmp_path))
    assert dataset.classes[0] == "Melanoma" and dataset.classes[3] == "Actinic keratosis"
    # label = the code's column, not its alphabetical place (AKIEC would be 0)
    labels = {Path(path).parent.name: label for path, label in dataset.source.samples}
    assert labels == {code: i for i, code in enumerate(ISIC_CODES)}
    assert_preprocessed(dataset[0][0])
    assert dataset.templates == ["A photo of {}."]

    (tmp_path / "isic2018" / "DF").rename(tmp_path / "isic2018" / "dermatofibroma")
    with pytest.raises(ValueError, match="exactly the class folders MEL, NV"):
        build_dataset("isic", split="test", data_root=str(tmp_path))
