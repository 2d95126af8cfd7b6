"""One registry of names to builders, for base classifiers and for datasets.

A classifier builder is called as `builder(class_names=..., sigma=..., **options)`
and returns a `torch.nn.Module` mapping [B, C, H, W] in [0, 1] to logits [B, K];
it normalizes inside its own forward. A dataset builder is called as
`builder(split=..., data_root=...)` and returns a `LabeledImages`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class UnknownNameError(KeyError):
    """A model or dataset name that no builder is registered for."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class LabeledImages(Protocol):
    """What the runner needs of a dataset: indexable (image [C,H,W] in [0,1], label) pairs."""

    classes: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    description: str


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, description: str = "") -> Callable:
        def decorate(builder: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, builder, description or (builder.__doc__ or ""))
            return builder

        return decorate

    def _resolve(self, name: str) -> tuple[Entry, tuple[str, ...]]:
        """The entry for `name`, and the argument a prefix entry (`folder:`) takes from it."""
        if name in self._entries:
            return self._entries[name], ()
        prefix, sep, rest = name.partition(":")
        if sep and prefix + ":" in self._entries:
            return self._entries[prefix + ":"], (rest,)
        known = ", ".join(e if not e.endswith(":") else e + "PATH" for e in sorted(self._entries))
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}")

    def get(self, name: str) -> Entry:
        return self._resolve(name)[0]

    def build(self, name: str, **kwargs: Any) -> Any:
        entry, args = self._resolve(name)
        return entry.builder(*args, **kwargs)

    def accepts(self, name: str, option: str) -> bool:
        """Whether the builder of `name` takes keyword `option` (not just **kwargs)."""
        parameters = inspect.signature(self.get(name).builder).parameters
        return option in parameters

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UnknownNameError:
            return False
        return True


CLASSIFIERS = Registry("model")
DATASETS = Registry("dataset")


def build_classifier(
    name: str, *, class_names: Sequence[str], sigma: float | None = None, **options: Any
) -> torch.nn.Module:
    """Build the base classifier registered as `name` for a task with these class names."""
    return CLASSIFIERS.build(name, class_names=class_names, sigma=sigma, **options)


def build_dataset(name: str, *, split: str = "test", data_root: str | None = None) -> LabeledImages:
    """Build the dataset registered as `name` (`folder:PATH` style names pass PATH first)."""
    return DATASETS.build(name, split=split, data_root=data_root)
