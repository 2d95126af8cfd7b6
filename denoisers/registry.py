"""Denoisers by name: `DENOISERS.build(name, sigma=..., **options)`.

Uses the project's one registry mechanism (`classifiers.registry.Registry`). Builders
import their modules lazily, so `import denoisers` does not import diffusers.

- `dds`: one-shot diffusion denoising with an unconditional diffusers `UNet2DModel` +
  `DDPMScheduler` (Carlini et al. 2023). Options: `checkpoint` (required), `device`,
  `dtype`, `resize`.
- `if2`: DeepFloyd IF-II super-resolution model as a denoiser with timestep correction
  (Choi et al. 2024, Eq. 9). Options: `checkpoint` (default `DeepFloyd/IF-II-L-v1.0`),
  `k` (1.8), `prompt` (""), `token` (""), `lora` (None), `device`, `dtype`, `variant`.

Checkpoints are hub ids or local directories written by `save_pretrained`; weights load
from safetensors only. A checkpoint that cannot be found raises `CheckpointNotFoundError`
saying how to get it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from classifiers.registry import Registry

DENOISERS = Registry("denoiser")

T = TypeVar("T")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# owner/name as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointNotFoundError(ValueError):
    """Model weights that are neither a local directory nor available from the Hub cache."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """fp32 | fp16 | bf16 (or the torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}; use fp32, fp16 or bf16")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (fp32, fp16, bf16) recorded in settings."""
    return _DTYPE_NAMES[dtype]


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The from_pretrained keyword for a dtype: `dtype` in diffusers >= 0.42 (checked
    here; it deprecates `torch_dtype`), `torch_dtype` before."""
    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__).release >= (0, 42):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def load_checkpoint(
    loader: Callable[[str], T], checkpoint: str | Path, *, what: str, how_to_get: str = ""
) -> T:
    """Call `loader(path_or_hub_id)`, turning "weights not found" into one clear error.

    A local directory is used as is. Anything else that looks like a hub id goes to the
    loader (diffusers/transformers `from_pretrained`), which reads the Hugging Face cache
    and, when online, downloads; every way that fails for lack of the files (offline
    and not cached, gated repository, no such repository or file) is an OSError there.
    """
    name = str(checkpoint)
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return loader(str(path))
        except OSError as error:
            raise CheckpointNotFoundError(
                f"{what}: {path} is not a complete save_pretrained directory ({error})"
            ) from error
    if not _HUB_ID.match(name) or path.exists():
        raise CheckpointNotFoundError(
            f"{what}: {name!r} is neither a directory nor a Hugging Face Hub id (owner/name)"
        )
    try:
        return loader(name)
    except OSError as error:
        hint = how_to_get or f"run `hf download {name}` (older clients: `huggingface-cli download`)"
        raise CheckpointNotFoundError(
            f"{what} {name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded (offline or no access). To get it, {hint} on a machine with network "
            f"access, or pass a local directory saved with save_pretrained. Cause: {error}"
        ) from error


@DENOISERS.register(
    "dds",
    "one-shot denoising with an unconditional diffusers UNet2DModel + DDPMScheduler "
    "(Carlini et al. 2023)",
)
def build_dds(
    *,
    sigma: float,
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    resize: bool = False,
) -> torch.nn.Module:
    from denoisers.dds import DDSDenoiser

    return DDSDenoiser.from_pretrained(
        checkpoint, sigma=sigma, device=device, dtype=dtype, resize=resize
    )


@DENOISERS.register(
    "if2",
    "DeepFloyd IF-II super-resolution model as a one-shot denoiser with timestep "
    "correction (Choi et al. 2024)",
)
def build_if2(
    *,
    sigma: float,
    checkpoint: str | Path = "DeepFloyd/IF-II-L-v1.0",
    k: float = 1.8,
    prompt: str = "",
    token: str = "",
    lora: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    variant: str | None = None,
) -> torch.nn.Module:
    from denoisers.if2 import IF2Denoiser

    return IF2Denoiser.from_pretrained(
        checkpoint,
        sigma=sigma,
        k=k,
        prompt=prompt,
        token=token,
        lora=lora,
        device=device,
        dtype=dtype,
        variant=variant,
    )


def build_denoiser(name: str, *, sigma: float, **options: Any) -> torch.nn.Module:
    """Build the denoiser registered as `name` for noise level `sigma`."""
    return DENOISERS.build(name, sigma=sigma, **options)


@DENOISERS.register(
    "ffdnet",
    "FFDNet colour Gaussian denoiser (Zhang et al. 2018), off the shelf as in Salman et al. "
    "2020; trained for sigma <= 75/255",
)
def build_ffdnet(
    *,
    sigma: float,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    allow_untrained_sigma: bool = False,
) -> torch.nn.Module:
    from denoisers.ffdnet import FFDNetDenoiser

    return FFDNetDenoiser.from_pretrained(
        checkpoint, sigma=sigma, device=device, dtype=dtype,
        allow_untrained_sigma=allow_untrained_sigma,
    )
