"""Label sets, prompt templates and reference sets: the inputs of `adapt`.

A label set is a list of class names in label order (label i = line i of a labels
file). A reference set (Choi et al. 2024, Sec. 3.2, D^g) is a few images per class;
`adapt synthesize` writes one as

    OUT/manifest.json                       classes, template, one record per image
    OUT/images/<label:04d>/<shot:02d>.png   folders named by label index, so any class
                                            name (slashes, accents, ...) is safe

and `load_reference_set` reads that, or any ImageFolder tree of your own
(`ROOT/<class name>/<image files>`, underscores in folder names read as spaces, as
the `folder:` dataset of `certify` reads them).

Rules for class names (`check_class_names`, `read_labels`):
- surrounding whitespace is stripped; blank lines at the end of a labels file are
  ignored, a blank line before a name is an error (it would shift every label after it);
- duplicates are an error, compared case-insensitively and with runs of whitespace
  collapsed: CLIP's tokenizer lowercases and cleans whitespace, so "Dog" and "dog" would
  get the same text embedding and could never be told apart.
Class names of a registered dataset (`dataset_labels`) are taken as the dataset
defines them: duplicates there (ImageNet's CLIP names list "missile" and
"sunglasses" twice) only warn, since the labels themselves are distinct.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from adapt.errors import AdaptError

MANIFEST = "manifest.json"
PLACEHOLDER = "{}"


class ReferenceSetError(AdaptError):
    """A reference folder that cannot be read as a reference set (missing, empty, broken)."""


def _key(name: str) -> str:
    return " ".join(name.lower().split())


def check_class_names(names: Sequence[str], *, source: str = "class names") -> list[str]:
    """Strip the names; refuse an empty list, blank names and case-insensitive duplicates."""
    cleaned = [str(name).strip() for name in names]
    if not cleaned:
        raise AdaptError(f"{source}: no class names")
    blank = [i for i, name in enumerate(cleaned) if not name]
    if blank:
        raise AdaptError(f"{source}: blank class name at label {blank[0]}")
    duplicates = _duplicates(cleaned)
    if duplicates:
        shown = "; ".join(
            " and ".join(f"{cleaned[i]!r} (label {i})" for i in group) for group in duplicates[:5]
        )
        raise AdaptError(
            f"{source}: duplicate class names (compared ignoring case and extra spaces): {shown}. "
            "Each class needs a distinct name: the prompts and CLIP's class embeddings are "
            "made from the names alone"
        )
    return cleaned


def _duplicates(names: Sequence[str]) -> list[list[int]]:
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        seen.setdefault(_key(name), []).append(i)
    return [group for group in seen.values() if len(group) > 1]


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one a line, in label order (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdaptError(f"labels file not found: {path}")
    if not path.is_file():
        raise AdaptError(f"labels file {path} is not a file (one class name a line expected)")
    try:
        # utf-8-sig: a byte-order mark from Windows editors is not part of the first name.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise AdaptError(f"labels file {path} is not UTF-8 text ({error})") from error
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise AdaptError(f"labels file {path} is empty: write one class name a line")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise AdaptError(
                f"labels file {path}: line {number} is blank; every line up to the last name "
                "must hold a class name (label i is line i + 1)"
            )
    return check_class_names(lines, source=f"labels file {path}")


def dataset_labels(name: str) -> list[str]:
    """Class names of a registered dataset (or `folder:PATH`), in label order; no data needed."""
    from classifiers.datasets import dataset_class_names

    names = [str(n).strip() for n in dataset_class_names(name)]
    if not names or not all(names):
        raise AdaptError(f"dataset {name!r} has no class names or a blank one")
    duplicates = _duplicates(names)
    if duplicates:
        shown = ", ".join(repr(names[group[0]]) for group in duplicates[:5])
        warnings.warn(
            f"dataset {name!r} names {len(duplicates)} class name(s) more than once ({shown}); "
            "their prompts, and so their reference images' prompts, are the same",
            stacklevel=2,
        )
    return names


def check_template(template: str) -> str:
    """A prompt template with exactly one "{}" for the class name (returned unchanged)."""
    template = str(template)
    count = template.count(PLACEHOLDER)
    if count != 1:
        found = "no" if count == 0 else f"{count}"
        raise AdaptError(
            f"prompt template {template!r} has {found} '{{}}' placeholder(s); it needs exactly "
            "one, where the class name goes (e.g. 'a photo of a {}.')"
        )
    return template


def fill_template(template: str, name: str) -> str:
    """The prompt C(name): the template's "{}" replaced by the class name.

    `str.replace` rather than `str.format`, as the CLIP classifier and the IF-II
    denoiser fill theirs, so other braces in a template are plain text.
    """
    return check_template(template).replace(PLACEHOLDER, name)


class ReferenceSet(torch.utils.data.Dataset):
    """(image [3, H, W] float in [0, 1], label) pairs read lazily from image files.

    Attributes: `root`, `classes` (names in label order), `samples` (list of
    (path, label)), `targets`, `manifest` (the parsed manifest.json, or None for an
    ImageFolder tree).
    """

    def __init__(
        self,
        root: Path,
        classes: Sequence[str],
        samples: Sequence[tuple[Path, int]],
        *,
        manifest: dict[str, Any] | None = None,
        size: int | None = None,
    ):
        from classifiers.datasets import image_transform

        self.root = Path(root)
        self.classes = list(classes)
        self.samples = [(Path(p), int(label)) for p, label in samples]
        self.targets = [label for _, label in self.samples]
        self.manifest = manifest
        self.size = size
        # The project's one PIL -> [0, 1] tensor path (RGB conversion included).
        self._to_tensor: Callable = image_transform("native")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                tensor = self._to_tensor(image).as_subclass(torch.Tensor)
        except OSError as error:
            raise ReferenceSetError(f"cannot read reference image {path}: {error}") from error
        if self.size is not None and tuple(tensor.shape[-2:]) != (self.size, self.size):
            from torchvision.transforms.v2 import functional as TF

            tensor = TF.resize(tensor, [self.size, self.size], antialias=True).clamp(0.0, 1.0)
        return tensor, label

    def __repr__(self) -> str:
        kind = "manifest" if self.manifest is not None else "ImageFolder"
        return (
            f"ReferenceSet({str(self.root)!r}, {kind}, {len(self)} images, "
            f"{len(self.classes)} classes)"
        )


def reference_fingerprint(references: ReferenceSet) -> str:
    """What a training run read from a reference set, as one line: the number of classes
    and images and a SHA-256 over the class names and, per image, its path in the set,
    label and file bytes. Any class added, renamed or reordered, or image added, removed
    or changed gives another line (the runs compare it to decide about resuming)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(references.classes, ensure_ascii=False).encode("utf-8"))
    root = references.root.resolve()
    for path, label in references.samples:
        resolved = Path(path).resolve()
        name = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(
            resolved
        )
        digest.update(json.dumps([name, label], ensure_ascii=False).encode("utf-8"))
        file_digest = hashlib.sha256()
        try:
            with open(resolved, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    file_digest.update(block)
        except OSError as error:
            raise ReferenceSetError(f"cannot read reference image {path}: {error}") from error
        digest.update(file_digest.digest())
    return (
        f"{len(references.classes)} classes, {len(references.samples)} images, "
        f"sha256:{digest.hexdigest()}"
    )


def load_reference_set(folder: str | os.PathLike, *, size: int | None = None) -> ReferenceSet:
    """Read a reference set: `folder/manifest.json` if present, else an ImageFolder tree.

    `size`: resize every image to size x size on reading (None: keep the files' size).
    Raises `ReferenceSetError` for a missing folder, a broken manifest, a manifest
    naming missing files, or a folder without images.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise ReferenceSetError(f"reference folder not found: {root}")
    if not root.is_dir():
        raise ReferenceSetError(f"reference set {root} is not a folder")
    if size is not None and size < 1:
        raise ReferenceSetError(f"reference image size must be >= 1, got {size}")
    if (root / MANIFEST).is_file():
        classes, samples, manifest = _from_manifest(root)
    else:
        classes, samples = _from_image_folder(root)
        manifest = None
    if not samples:
        raise ReferenceSetError(
            f"reference folder {root} holds no images: expected the output of `adapt "
            f"synthesize` ({MANIFEST} + images/) or an ImageFolder tree {root}/<class name>/"
            "<image files>"
        )
    counts = torch.bincount(torch.tensor([label for _, label in samples]), minlength=len(classes))
    empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        warnings.warn(
            f"reference set {root}: {len(empty)} of {len(classes)} classes have no image "
            f"(e.g. {empty[:3]})",
            stacklevel=2,
        )
    return ReferenceSet(root, classes, samples, manifest=manifest, size=size)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The parsed `root/manifest.json`, checked for the fields every reader relies on."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReferenceSetError(f"cannot read {path}: {error}") from error
    if not isinstance(manifest, dict):
        raise ReferenceSetError(f"{path}: expected a JSON object")
    classes = manifest.get("classes")
    images = manifest.get("images")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ReferenceSetError(f"{path}: 'classes' must be a list of class names")
    if not isinstance(images, list) or not all(isinstance(r, dict) for r in images):
        raise ReferenceSetError(f"{path}: 'images' must be a list of records")
    return manifest


def _from_manifest(root: Path) -> tuple[list[str], list[tuple[Path, int]], dict[str, Any]]:
    manifest = read_manifest(root)
    classes = list(manifest["classes"])
    samples: list[tuple[Path, int]] = []
    flagged = 0
    resolved_root = root.resolve()
    for record in manifest["images"]:
        try:
            relative, label = str(record["path"]), int(record["label"])
        except (KeyError, TypeError, ValueError) as error:
            raise ReferenceSetError(
                f"{root / MANIFEST}: an image record without a valid path and label: {record}"
            ) from error
        if not 0 <= label < len(classes):
            raise ReferenceSetError(
                f"{root / MANIFEST}: {relative} has label {label}, outside the "
                f"{len(classes)} classes"
            )
        path = (root / relative).resolve()
        if not path.is_relative_to(resolved_root):
            raise ReferenceSetError(f"{root / MANIFEST}: {relative} points outside {root}")
        if not path.is_file():
            raise ReferenceSetError(
                f"{root / MANIFEST} lists {relative}, which is missing; rerun `adapt synthesize` "
                f"with the same settings into {root} to regenerate it"
            )
        if record.get("nsfw_detected"):
            # The IF safety checker blacks such images out: they would teach a blank image.
            flagged += 1
            continue
        samples.append((path, label))
    if flagged:
        warnings.warn(
            f"reference set {root}: skipped {flagged} image(s) the safety checker blanked out",
            stacklevel=3,
        )
    return classes, samples, manifest


def _from_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        raw, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        return [], []
    # The same naming rule as `certify --dataset folder:PATH` (classifiers.datasets).
    classes = [name.replace("_", " ") for name in raw]
    samples = make_dataset(
        str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
    )
    return classes, [(Path(path), label) for path, label in samples]
