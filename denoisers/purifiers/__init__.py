"""Purifiers of seeds 000-003, the empirical baselines: `PURIFIERS.build(name, classifier=...)`.

See `denoisers.purifiers.base` for what a purified model is and the gradient modes.
Each builder imports its module on first use, so `import denoisers.purifiers` imports
neither diffusers nor transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from denoisers.purifiers.base import (
    ATTACK_GRADIENTS,
    GRADIENTS,
    PURIFIERS,
    PixelPurifier,
    PurifiedClassifier,
    check_gradient,
)

__all__ = [
    "ATTACK_GRADIENTS",
    "GRADIENTS",
    "PURIFIERS",
    "PixelPurifier",
    "PurifiedClassifier",
    "build_purifier",
    "check_gradient",
]


def _lazy(module: str, function: str) -> Callable[..., Any]:
    def build(**options: Any) -> Any:
        builder = getattr(importlib.import_module(f"denoisers.purifiers.{module}"), function)
        return builder(**options)

    return build


# name, module:function, description (first line shown by --list-purifiers)
for _name, _target, _description in (
    ("clipure-cos", "clipure:build_cos",
     "CLIPure-Cos (seed 000): cosine ascent of the CLIP image embedding toward the blank prompt"),
    ("clipure-diff", "clipure:build_diff",
     "CLIPure-Diff (seed 000): embedding ascent on a diffusion prior's likelihood"),
    ("lgap", "lgap:build",
     "LGAP (seed 001): BLIP caption, then caption-guided latent diffusion img2img"),
    ("zeropur", "zeropur:build",
     "ZeroPur (seed 002): guided shift toward a blurred copy, then adaptive projection"),
    ("cmap", "cmap:build",
     "CMAP (seed 003): consistency-model latents fitted to the input, majority vote"),
):
    PURIFIERS.register(_name, _description)(_lazy(*_target.split(":")))


def build_purifier(name: str, *, classifier: Any, gradient: str = "exact", **options: Any) -> Any:
    """The purified model registered as `name` around `classifier` (see `base`)."""
    check_gradient(gradient)
    return PURIFIERS.build(name, classifier=classifier, gradient=gradient, **options)
