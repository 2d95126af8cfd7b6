"""Evaluation protocols: what a paper's own code does per dataset, under one name.

`choi2024` is the protocol of Choi et al. (ECCV 2024) as their code runs it
(github.com/ChoiDae1/robustify-T2I: evaluate.py, utils.py, TeCoA/utils.py,
TeCoA/cross_datasets.py and the dataset classes in replace/). Read, not copied: the
strings below are the facts that code uses, each with the file it is in.

Per dataset the protocol fixes
- the CLIP zero-shot template: one per dataset, "This is a photo of a {}" (no full
  stop) for ImageNet, STL-10 and SUN397 (evaluate.py's default, used where a dataset
  class defines no prompts), and Mao et al.'s (TeCoA) template elsewhere, which the
  reference's dataset classes carry as `clip_prompts`;
- the class names as that code forms them from the dataset's own names (lower case,
  "_" and "-" as spaces; "/" too for STL-10 and SUN397; the year dropped from Stanford
  Cars' names; CLIP's official ImageNet names unchanged; its own Flowers-102 list);
- the IF-II text template C(.) of Eq. 9 (`return_prompt` in utils.py), which the
  denoiser fills with an empty label (Eq. 9), or with the personalized token after
  `adapt`;
- preprocessing: resize 256 / center crop 224, STL-10 at its native 96 x 96 (as the
  plain defaults already do);
- the evaluation subset: every floor(len / 500)-th example from index 0 (evaluate.py's
  `skip = floor(len(test_dataset) / nrows)` with nrows = 500, and `i % skip == 0`);
- the IF-II condition level: the float k * t clamped at T ("reference" rounding).

This module only states facts about datasets; the CLI wires them into the runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .datasets import ImageDataset, build_benchmark, dataset_class_names


class ProtocolError(ValueError):
    """A protocol that does not exist or does not cover what it is applied to."""


def _lower(raw: str) -> str:
    # TeCoA's rule in the reference dataset classes: label.lower() with "_", "-" -> " ".
    return raw.lower().replace("_", " ").replace("-", " ")


def _lower_slash(raw: str) -> str:
    # `refine_classname` (TeCoA/utils.py), for datasets without their own prompts.
    return _lower(raw).replace("/", " ")


def _cars(raw: str) -> str:
    # replace/stanford_cars.py: label[:-5] drops the year (" 2012") before the rule.
    return _lower(raw[:-5])


def _caltech256(raw: str) -> str:
    # replace/caltech.py: "001.ak47" -> class_name[4:], "-101" removed, the rule, strip().
    return _lower(raw[4:].replace("-101", "")).strip()


def _unchanged(raw: str) -> str:
    return raw


# The reference's own Flowers-102 list (replace/flowers102.py) differs from CLIP's, which
# `dataset_class_names("flowers102")` gives, at these labels; the rest is the same.
_REFERENCE_FLOWERS = {
    11: "colts foot", 15: "globe-flower", 59: "pink-yellow dahlia?", 87: "cyclamen ",
    90: "hippeastrum ", 92: "ball moss",
}


@dataclass(frozen=True)
class DatasetProtocol:
    """What a protocol fixes for one dataset."""

    dataset: str  # our dataset name
    reference_name: str  # the reference code's --testdata value
    clip_template: str
    if2_template: str
    # raw names (what torchvision's class, or our list, gives) -> the names prompts use
    name_rule: Callable[[str], str]
    # where the raw names come from: "torchvision" (the loaded dataset's own names) or
    # "ours" (`dataset_class_names`, which holds the same list as the reference)
    names_from: str = "torchvision"
    source: str = ""


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol: per-dataset facts plus the subsample and rounding rules."""

    name: str
    title: str
    datasets: Mapping[str, DatasetProtocol]
    subsample_rows: int = 500
    timestep_rounding: str = "reference"

    def for_dataset(self, dataset: str) -> DatasetProtocol:
        """The facts for `dataset`, or a ProtocolError naming the datasets covered."""
        try:
            return self.datasets[dataset]
        except KeyError:
            raise ProtocolError(
                f"--protocol {self.name} does not cover dataset {dataset!r}; it covers "
                f"{', '.join(self.datasets)}"
            ) from None

    def subsample_skip(self, length: int) -> int:
        """floor(len / 500): the step of the evaluation subset (evaluate.py)."""
        skip = length // self.subsample_rows  # floor, in integers
        if skip < 1:
            # The reference code would divide by zero here (i % 0).
            raise ProtocolError(
                f"--protocol {self.name} takes every floor(len/{self.subsample_rows})-th "
                f"example; this dataset has {length} (< {self.subsample_rows})"
            )
        return skip

    def subsample(self, length: int) -> list[int]:
        """Indices 0, skip, 2 skip, ... < len: the examples the reference code evaluates."""
        return list(range(0, length, self.subsample_skip(length)))

    def class_names(self, dataset: str, raw: list[str] | None) -> list[str]:
        """Class names as the reference forms them, from the dataset's raw names."""
        facts = self.for_dataset(dataset)
        if facts.names_from == "torchvision":
            if raw is None:
                raise ProtocolError(f"{dataset}: the loaded dataset exposes no class names")
            names = list(raw)
        else:
            names = dataset_class_names(dataset)
            if dataset == "flowers102":
                names = [_REFERENCE_FLOWERS.get(i, n) for i, n in enumerate(names)]
        return [facts.name_rule(n) for n in names]

    def build_dataset(
        self, dataset: str, split: str = "test", data_root: str | os.PathLike | None = None
    ) -> ImageDataset:
        """Open `dataset` with the protocol's class names and its one CLIP template."""
        facts = self.for_dataset(dataset)
        base = build_benchmark(dataset, split=split, data_root=data_root)
        source = base.source
        raw = getattr(source, "classes", None) or getattr(source, "categories", None)
        names = self.class_names(dataset, None if raw is None else list(raw))
        if len(names) != len(base.classes):
            raise ProtocolError(
                f"{dataset}: {len(names)} protocol class names for {len(base.classes)} classes"
            )
        return ImageDataset(
            source, names, name=dataset, split=split, templates=[facts.clip_template]
        )

    def record(self, dataset: str, length: int) -> dict[str, Any]:
        """What the run's JSON says about the protocol."""
        facts = self.for_dataset(dataset)
        skip = self.subsample_skip(length)
        return {
            "name": self.name,
            "reference_dataset": facts.reference_name,
            "clip_template": facts.clip_template,
            "if2_template": facts.if2_template,
            "subsample": {"rule": f"every floor(len/{self.subsample_rows})-th from 0",
                          "length": length, "skip": skip},
            "timestep_rounding": self.timestep_rounding,
            "explicit_options": "refused where they differ from the protocol",
        }


_THIS_IS = "This is a photo of a {}"  # evaluate.py: `template = 'This is a photo of a {}'`
_IF_THIS_IS = "This is a photo of a {}."  # utils.py return_prompt: imagenet, sun, stl-10

CHOI2024 = Protocol(
    name="choi2024",
    title="Choi et al. (ECCV 2024), as robustify-T2I's evaluate.py runs it",
    datasets={
        facts.dataset: facts
        for facts in (
            DatasetProtocol("imagenet", "ImageNet", _THIS_IS, _IF_THIS_IS, _unchanged,
                            names_from="ours",
                            source="TeCoA/imagenet_classes_names_clip.txt (= open_clip's "
                                   "IMAGENET_CLASSNAMES, all 1000 equal)"),
            DatasetProtocol("stl10", "STL10", _THIS_IS, _IF_THIS_IS, _lower_slash,
                            source="torchvision STL10.classes, TeCoA refine_classname"),
            DatasetProtocol("sun397", "SUN397", _THIS_IS, _IF_THIS_IS, _lower_slash,
                            source="torchvision SUN397.classes, TeCoA refine_classname"),
            DatasetProtocol("cars", "StanfordCars", "A photo of a {}.", "A photo of a {}.",
                            _cars, source="replace/stanford_cars.py"),
            DatasetProtocol("food101", "Food101", "A photo of {}, a type of food.",
                            "A photo of a {}, a type of food.", _lower,
                            source="replace/food101.py"),
            DatasetProtocol("pets", "oxfordpet", "A photo of a {}, a type of pet.",
                            "A photo of a {}, a type of pet.", _lower,
                            source="replace/oxford_iiit_pet.py"),
            DatasetProtocol("flowers102", "flowers102", "A photo of a {}, a type of flower.",
                            "A photo of a {}, a type of flower.", _lower, names_from="ours",
                            source="replace/flowers102.py (its own _classes list)"),
            DatasetProtocol("dtd", "dtd", "A surface with a {} texture.",
                            "A surface with a {} texture.", _lower, source="replace/dtd.py"),
            DatasetProtocol("caltech256", "Caltech256", "A photo of a {}.", "A photo of a {}.",
                            _caltech256, source="replace/caltech.py (Caltech256)"),
            DatasetProtocol("eurosat", "EuroSAT", "A centered satellite photo of {}.",
                            "A centered satellite photo of {}.", _lower,
                            source="replace/eurosat.py (its folder names)"),
            DatasetProtocol("cropdiseases", "cropdisease", "A leaf photo of {}.",
                            "A leaf photo of {}.", _lower, names_from="ours",
                            source="TeCoA/cross_datasets.py CropDisease"),
            # evaluate.py calls return_prompt("isic"), whose ISIC branch tests "isic2018":
            # the reference's IF-II prompt for ISIC is the default one.
            DatasetProtocol("isic", "isic", "A photo of {}.", _IF_THIS_IS, _lower,
                            names_from="ours", source="TeCoA/cross_datasets.py ISIC2018"),
        )
    },
)

PROTOCOLS: dict[str, Protocol] = {CHOI2024.name: CHOI2024}


def get_protocol(name: str) -> Protocol:
    """The protocol registered as `name`, or a ProtocolError listing the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ProtocolError(
            f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}"
        ) from None

