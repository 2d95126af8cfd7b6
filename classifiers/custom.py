"""Your own base classifier: `--model path/to/file.py:factory` or `--model package.module:factory`.

The factory is any callable returning a `torch.nn.Module` that maps [B, C, H, W]
in [0, 1] to logits [B, K] (normalizing inside its own forward). It is called with
the keywords it names among `class_names`, `num_classes` and `sigma`, and with no
arguments otherwise. The result records where the code came from, with the
sha256 of its file, so a rerun with changed code is not silently resumed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# package.module:factory (dotted identifiers), or anything ending in .py before the colon
_MODULE_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_FILE_REFERENCE = re.compile(r".+\.py:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class FactoryError(ValueError):
    """A `--model X:factory` that cannot be imported, called, or does not give a module."""


def is_factory_reference(name: str, registered_prefixes: Sequence[str] = ()) -> bool:
    """Whether `name` names a factory (file.py:f or pkg.mod:f) rather than a registry entry.

    A registry prefix entry (`folder:`, `cohen:`, ...) takes precedence: `cohen:x` is
    never read as module `cohen`.
    """
    prefix = name.partition(":")[0] + ":"
    if prefix in registered_prefixes:
        return False
    return bool(_FILE_REFERENCE.fullmatch(name) or _MODULE_REFERENCE.fullmatch(name))


def _load_module(location: str) -> tuple[Any, Path | None]:
    if location.endswith(".py"):
        path = Path(location).expanduser().resolve()
        if not path.is_file():
            raise FactoryError(f"--model {location}: no such file")
        # A unique module name per file, so two files called model.py do not collide.
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        module_name = f"_robustify_custom_{path.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise FactoryError(f"--model {location}: cannot be loaded as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[module_name]
            raise FactoryError(f"--model {location}: importing it failed: {error!r}") from error
        return module, path
    try:
        module = importlib.import_module(location)
    except ImportError as error:
        raise FactoryError(f"--model {location}: cannot import module ({error})") from error
    source = getattr(module, "__file__", None)
    return module, Path(source) if source else None


def resolve_factory(reference: str) -> tuple[Any, dict[str, Any]]:
    """The callable named by `reference`, and a record of its source (file and sha256)."""
    location, _, attribute = reference.rpartition(":")
    module, path = _load_module(location)
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise FactoryError(f"--model {reference}: {location} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise FactoryError(f"--model {reference}: {attribute} is not callable")
    record = {
        "factory": reference,
        "file": None if path is None else str(path),
        "file_sha256": None if path is None else hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return factory, record


def build_from_factory(
    reference: str,
    *,
    class_names: Sequence[str],
    sigma: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Call the factory named by `reference`; the module (on `device`, eval mode) and its record."""
    factory, record = resolve_factory(reference)
    offered = {"class_names": list(class_names), "num_classes": len(class_names), "sigma": sigma}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature: call them bare
        parameters = {}
    arguments = {key: value for key, value in offered.items() if key in parameters}
    try:
        model = factory(**arguments)
    except Exception as error:
        raise FactoryError(f"--model {reference}: calling the factory failed: {error!r}") from error
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(
            f"--model {reference}: the factory returned a {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model.to(device).eval(), record


def check_output_shape(
    model: torch.nn.Module, image: torch.Tensor, num_classes: int, reference: str
) -> None:
    """Run one image through `model`; refuse logits of another shape before anything is written."""
    try:
        with torch.inference_mode():
            logits = model(image.unsqueeze(0))
    except Exception as error:
        raise FactoryError(
            f"--model {reference}: the model fails on an image of shape "
            f"{tuple(image.shape)} from the dataset: {error!r}"
        ) from error
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise FactoryError(
            f"--model {reference}: the model returned {shape} for one image; expected logits "
            f"of shape [1, {num_classes}] (one column per class of the dataset)"
        )


# -- library models by name: open_clip:ARCH/TAG and torchvision:NAME/WEIGHTS ----------------


def _split_name_and_tag(spec: str, prefix: str) -> tuple[str, str | None]:
    name, _, tag = spec.partition("/")
    if not name:
        raise ValueError(f"--model {prefix}:{spec}: expected {prefix}:NAME or {prefix}:NAME/TAG")
    return name, tag or None


def build_open_clip(
    spec: str,
    *,
    class_names: Sequence[str],
    sigma: float | None = None,
    templates: Sequence[str] | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> torch.nn.Module:
    """Any open_clip architecture as a zero-shot classifier: `open_clip:ViT-B-16/laion2b_s34b_b88k`.

    Args:
        spec: `ARCH/TAG` (an open_clip pretrained tag of ARCH), or `ARCH` with
            `pretrained` a local open_clip checkpoint file (--classifier-checkpoint).
        class_names, templates, weights, device, cache_dir: as for `build_clip`.
        sigma: unused.
    """
    del sigma
    import open_clip

    from .clip import CLIPZeroShotClassifier, _create_open_clip
    from .weights_io import load_classifier_weights

    arch, tag = _split_name_and_tag(spec, "open_clip")
    if arch not in open_clip.list_models():
        raise ValueError(f"--model open_clip:{spec}: open_clip has no architecture {arch!r}")
    if tag is not None and pretrained is not None:
        raise ValueError(f"--model open_clip:{spec} names its weights already; "
                         "drop --classifier-checkpoint, or the /TAG")
    source = tag if tag is not None else pretrained
    if source is None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(
            f"--model open_clip:{arch} needs weights: open_clip:{arch}/TAG "
            f"(tags: {', '.join(tags) or 'none'}) or --classifier-checkpoint FILE"
        )
    if templates is None:
        from .datasets import default_templates

        templates = default_templates()
    # OpenAI's weights were trained with QuickGELU, which open_clip's plain configs lack;
    # the other tags of a plain config (laion, datacomp, ...) were trained with GELU.
    quick_gelu = tag == "openai"
    model = _create_open_clip(f"open_clip:{arch}", arch, source, quick_gelu=quick_gelu,
                              device=device)
    if weights is not None:
        load_classifier_weights(model, weights)
    model.eval()
    return CLIPZeroShotClassifier(
        model, open_clip.get_tokenizer(arch), class_names, templates, arch=arch,
        cache_dir=cache_dir,
    ).to(device)


def build_torchvision_by_name(
    spec: str,
    *,
    class_names: Sequence[str],
    sigma: float | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Any torchvision classification model: `torchvision:NAME` or `torchvision:NAME/WEIGHTS`.

    WEIGHTS is a member of the model's weights enum (default IMAGENET1K_V1 where it
    exists, else DEFAULT); `pretrained` (--classifier-checkpoint) may instead be a local
    file of the same ImageNet network, and `weights` (--classifier-weights) fine-tuned
    weights with `len(class_names)` outputs. Inputs are normalized with the mean/std of
    the weights' own evaluation transforms and not resized.
    """
    del sigma
    import torchvision.models

    from .torchvision_models import (
        DEFAULT_WEIGHTS,
        IMAGENET_CLASSES,
        ClassCountError,
        NormalizedClassifier,
        _load_pretrained,
    )
    from .weights_io import load_classifier_weights

    name, tag = _split_name_and_tag(spec, "torchvision")
    known = torchvision.models.list_models(module=torchvision.models)  # classification only
    if name not in known:
        raise ValueError(
            f"--model torchvision:{spec}: {name!r} is not a torchvision classification model; "
            f"known: {', '.join(known)}"
        )
    if tag is not None and pretrained is not None:
        raise ValueError(f"--model torchvision:{spec} names its weights already; "
                         "drop --classifier-checkpoint, or the /WEIGHTS")
    weights_enum = torchvision.models.get_model_weights(name)
    members = weights_enum.__members__
    chosen = tag or pretrained or (DEFAULT_WEIGHTS if DEFAULT_WEIGHTS in members else "DEFAULT")
    if tag is not None and tag not in members:
        raise ValueError(
            f"--model torchvision:{spec}: {name} has no weights {tag!r}; known: "
            f"{', '.join(members)}"
        )
    constructor = torchvision.models.get_model_builder(name)
    num_classes = len(class_names)
    if weights is not None:
        network = constructor(weights=None, num_classes=num_classes)
        load_classifier_weights(network, weights)
    else:
        if num_classes != IMAGENET_CLASSES:
            raise ClassCountError(
                f"torchvision:{name} with ImageNet weights predicts {IMAGENET_CLASSES} classes, "
                f"but the task has {num_classes}; pass fine-tuned --classifier-weights"
            )
        network = constructor(weights=None, num_classes=IMAGENET_CLASSES)
        _load_pretrained(f"torchvision:{name}", network, weights_enum, chosen)
    member = weights_enum[chosen] if chosen in members else weights_enum["DEFAULT"]
    preset = member.transforms()
    return NormalizedClassifier(network, preset.mean, preset.std).to(device).eval()


def _register() -> None:
    from .registry import CLASSIFIERS

    CLASSIFIERS.register(
        "open_clip:", "any open_clip model zero-shot, ARCH/TAG (e.g. ViT-B-16/laion2b_s34b_b88k)"
    )(build_open_clip)
    CLASSIFIERS.register(
        "torchvision:", "any torchvision classifier, NAME or NAME/WEIGHTS (e.g. resnet50)"
    )(build_torchvision_by_name)


_register()
