"""Denoisers for denoised smoothing: diffusion one-shot (DDS) and DeepFloyd IF-II.

`DENOISERS.build("dds" | "if2", sigma=..., **options)` builds one for a noise level;
`DenoiseAndClassify(denoiser, classifier, sigma)` is the base classifier to smooth.
The model classes (`DDSDenoiser`, `IF2Denoiser`) import diffusers, so they load on
first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from denoisers.pipeline import DenoiseAndClassify, Denoiser
from denoisers.registry import DENOISERS, CheckpointNotFoundError, build_denoiser
from denoisers.timesteps import corrected_timestep, timestep_for_sigma

# The DDPM trained on the digits training split by denoisers/train_digits_ddpm.py.
BUNDLED_DIGITS_DDPM = Path(__file__).resolve().parent / "weights" / "digits_ddpm"

__all__ = [
    "BUNDLED_DIGITS_DDPM",
    "DENOISERS",
    "CheckpointNotFoundError",
    "DDSDenoiser",
    "DenoiseAndClassify",
    "Denoiser",
    "IF2Denoiser",
    "build_denoiser",
    "corrected_timestep",
    "timestep_for_sigma",
]

_LAZY = {"DDSDenoiser": "denoisers.dds", "IF2Denoiser": "denoisers.if2"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'denoisers' has no attribute {name!r}")
