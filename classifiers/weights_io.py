"""Reading and writing classifier weights (the `--classifier-weights` files).

A weights file holds the state dict of a classifier's network, i.e. of
`classifier.model` for the wrappers in this package (an open_clip model, a
torchvision ResNet): the same keys those libraries use, so checkpoints made
elsewhere for the same architecture load as they are.

Files are read from safetensors, or from `.pt`/`.pth`/`.bin` with
`torch.load(..., weights_only=True)`: never by unpickling arbitrary objects.
Keys must match exactly; a mismatch is one error that lists what is missing,
unexpected or of the wrong shape.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class WeightsNotFoundError(ValueError):
    """Weights that are neither on disk nor obtainable here (no network, wrong path)."""


class WeightsMismatchError(ValueError):
    """A weights file whose keys or shapes do not fit the network it is loaded into."""


def load_torch_file(
    path: str | os.PathLike,
    error: type[Exception] = WeightsMismatchError,
    *,
    what: str = "",
    expected: str = "only plain state dicts of tensors are accepted, never pickled objects",
) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; any failure is one `error` naming
    the file (`what` before it) and what was `expected`. The one place that reads torch
    files: nothing is ever unpickled."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as cause:  # pickle errors come in many types; report them as one
        raise error(
            f"{what}{path} cannot be read with torch.load(weights_only=True) ({cause}); "
            f"{expected}"
        ) from cause


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors stored in `path` (safetensors, or a torch file read with weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError (truncated, not safetensors), OSError
            raise WeightsMismatchError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated "
                "or in another format"
            ) from error
    if suffix not in TORCH_SUFFIXES:
        raise WeightsMismatchError(
            f"{path}: unknown weights format {suffix!r}; use .safetensors "
            f"(or {', '.join(TORCH_SUFFIXES)} readable with torch.load(weights_only=True))"
        )
    loaded = load_torch_file(path)
    # Training scripts often wrap the state dict as {"state_dict": {...}} (as open_clip's do).
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise WeightsMismatchError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsMismatchError(
            f"{path} is not a plain state dict: entries that are not tensors: "
            f"{_listing(not_tensors)}"
        )
    return dict(loaded)


def load_classifier_weights(module: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load the state dict in `path` into `module` with strict key and shape matching.

    Returns `module`. Raises `WeightsNotFoundError` when the file is missing and
    `WeightsMismatchError` listing missing, unexpected and mis-shaped keys.
    """
    state = read_state_dict(path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = [f"{path} does not fit {type(module).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if misshaped:
            parts.append(f"wrong shapes ({len(misshaped)}): {_listing(misshaped)}")
        hint = _prefix_hint(list(expected), list(state))
        if hint:
            parts.append(hint)
        raise WeightsMismatchError("\n  ".join(parts))
    module.load_state_dict(state, strict=True)
    return module


def save_classifier_weights(module: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the state dict of `module` to `path` as safetensors (atomically); return the path."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"classifier weights are saved as .safetensors, not {path.name!r}")
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, value in module.state_dict().items():
        value = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights): store copies.
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen_storage and value.numel() > 0:
            value = value.clone()
        seen_storage.add(pointer)
        tensors[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp_name, metadata={"format": "pt"})
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _prefix_hint(expected: list[str], found: list[str]) -> str:
    """A hint when the file's keys are the model's with a prefix added or removed."""
    if not expected or not found:
        return ""
    for longer, shorter, where in ((found, expected, "file"), (expected, found, "model")):
        prefix = longer[0].split(".", 1)[0] + "."
        if all(k.startswith(prefix) for k in longer) and {
            k[len(prefix) :] for k in longer
        } == set(shorter):
            return (
                f"hint: every key of the {where} starts with {prefix!r}; the file must hold "
                "the state dict of the network itself (`classifier.model`), without prefixes"
            )
    return ""
