"""CLIP zero-shot classifiers (open_clip, OpenAI weights): `clip-b32`, `clip-b16`, `clip-l14`.

The zero-shot head is CLIP's (Radford et al., 2021; CLIPure Sec. 3): each class
embedding is the mean over prompt templates of the L2-normalized text embeddings
of "template with the class name", renormalized; the logits are
`logit_scale.exp() * cosine(image embedding, class embedding)`. The scale is the
model's own learned temperature, which is 100 for the OpenAI checkpoints; it
changes no argmax, but softmax-based uses (fine-tuning, attacks) see CLIP's
calibration.

Class embeddings are computed once per (text-tower weights, tokenizer, class
names, templates) and cached on disk as safetensors: the cache key hashes the
text tower's parameters themselves, so pretrained tags, local checkpoints and
fine-tuned weights can never share a stale entry.

Inputs are [B, 3, H, W] in [0, 1] (noisy ones may leave that range); the forward
resizes to the model's image size when H, W differ (bicubic, antialiased, as the
model's preprocess config says; no clamping, so Gaussian noise passes through a
linear map) and normalizes with the mean/std of that config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .registry import CLASSIFIERS
from .weights_io import WeightsMismatchError, WeightsNotFoundError, load_classifier_weights

log = logging.getLogger(__name__)

# Our model name -> (open_clip architecture, Hugging Face repo open_clip fetches "openai" from).
OPENAI_MODELS: dict[str, tuple[str, str]] = {
    "clip-b32": ("ViT-B-32", "timm/vit_base_patch32_clip_224.openai"),
    "clip-b16": ("ViT-B-16", "timm/vit_base_patch16_clip_224.openai"),
    "clip-l14": ("ViT-L-14", "timm/vit_large_patch14_clip_224.openai"),
}

CACHE_FORMAT = 1  # bump when the way class embeddings are computed changes
PROGRESS_MIN_PROMPTS = 2000


def default_cache_dir() -> Path:
    """Where text embeddings are cached: $XDG_CACHE_HOME (or ~/.cache)/robustify/text_embeddings."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robustify" / "text_embeddings"


class CLIPZeroShotClassifier(torch.nn.Module):
    """An open_clip model with a zero-shot head: [B, 3, H, W] in [0, 1] -> logits [B, K].

    Attributes: `model` (the open_clip model), `class_names`, `templates`,
    `class_embeddings` ([K, D] buffer, unit rows), `image_size`, `arch`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        class_names: Sequence[str],
        templates: Sequence[str],
        *,
        arch: str,
        cache_dir: str | os.PathLike | None = None,
        text_batch_size: int = 256,
    ):
        super().__init__()
        if not class_names:
            raise ValueError("a zero-shot classifier needs at least one class name")
        templates = [_checked_template(t) for t in templates]
        if not templates:
            raise ValueError("a zero-shot classifier needs at least one prompt template")
        self.model = model
        self.tokenizer = tokenizer
        self.class_names = [str(c) for c in class_names]
        self.templates = templates
        self.arch = arch
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.text_batch_size = text_batch_size

        cfg = model.visual.preprocess_cfg  # set by open_clip.create_model
        size = model.visual.image_size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode = cfg.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported open_clip resize_mode {self.resize_mode!r}")
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, -1, 1, 1), persistent=False)
        # Not persistent: the classifier's state dict is the open_clip model's (under
        # "model."), and the embeddings are derived from it.
        self.register_buffer("class_embeddings", torch.empty(0), persistent=False)
        self.rebuild_class_embeddings()
        self.eval()

    # -- image side --------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the model's input size if needed, then normalize with CLIP's mean/std."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if tuple(images.shape[-2:]) != self.image_size:
            mode = InterpolationMode(self.interpolation)
            if self.resize_mode == "squash":
                images = TF.resize(images, list(self.image_size), mode, antialias=True)
            else:  # shorter side to the target, then a center crop (CLIP's own transform)
                scale = max(t / s for t, s in zip(self.image_size, images.shape[-2:], strict=True))
                target = [round(s * scale) for s in images.shape[-2:]]
                images = TF.resize(images, target, mode, antialias=True)
                images = TF.center_crop(images, list(self.image_size))
        return (images - self.mean) / self.std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [B, D] of images in [0, 1]."""
        return F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)

    def forward(
        self, images: torch.Tensor, class_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, K]; `class_embeddings` overrides the stored ones (e.g. with gradients)."""
        weights = self.class_embeddings if class_embeddings is None else class_embeddings
        scale = self.model.logit_scale.exp()  # CLIP's learned temperature (100 for OpenAI)
        return scale * self.encode_images(images) @ weights.t()

    # -- text side ---------------------------------------------------------------------

    def compute_class_embeddings(self, *, grad: bool = False) -> torch.Tensor:
        """Class embeddings [K, D] from the current text encoder (no cache).

        With `grad=True` the graph through the text encoder is kept, for fine-tuning it.
        """
        from tqdm.auto import tqdm

        device = self.model.logit_scale.device
        prompts = [t.replace("{}", name) for name in self.class_names for t in self.templates]
        chunks = []
        # ImageNet's 80 x 1000 prompts take the better part of an hour on a small CPU:
        # show progress for long jobs (the result is cached, so this happens once).
        progress = tqdm(
            total=len(prompts), desc=f"{self.arch} text embeddings", unit="prompt",
            disable=len(prompts) < PROGRESS_MIN_PROMPTS, leave=False,
        )
        with progress, torch.set_grad_enabled(grad):
            for start in range(0, len(prompts), self.text_batch_size):
                batch = prompts[start : start + self.text_batch_size]
                tokens = self.tokenizer(batch).to(device)
                chunks.append(F.normalize(self.model.encode_text(tokens), dim=-1))
                progress.update(len(batch))
            per_prompt = torch.cat(chunks).view(len(self.class_names), len(self.templates), -1)
            return F.normalize(per_prompt.mean(dim=1), dim=-1)

    def rebuild_class_embeddings(self, *, use_cache: bool = True) -> torch.Tensor:
        """Recompute `class_embeddings` from the current text encoder (through the cache)."""
        key = self.cache_key() if use_cache else None
        embeddings = self._read_cache(key) if key else None
        if embeddings is None:
            embeddings = self.compute_class_embeddings(grad=False).detach()
            if key:
                self._write_cache(key, embeddings)
        device = self.model.logit_scale.device
        dtype = self.model.logit_scale.dtype
        self.class_embeddings = embeddings.to(device=device, dtype=dtype)
        return self.class_embeddings

    def cache_key(self) -> str:
        """sha256 of everything the class embeddings depend on."""
        digest = hashlib.sha256()
        header = {
            "format": CACHE_FORMAT,
            "arch": self.arch,
            "tokenizer": type(self.tokenizer).__name__,
            "context_length": getattr(self.tokenizer, "context_length", None),
            "class_names": self.class_names,
            "templates": self.templates,
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            if name.startswith("visual."):
                continue  # the image tower does not touch text embeddings
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().data)
        return digest.hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{self.arch}-{key[:40]}.safetensors"

    def _read_cache(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self._cache_path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    return None
                embeddings = handle.get_tensor("class_embeddings")
        except Exception as error:  # a truncated or foreign file: recompute
            log.warning("ignoring unreadable text-embedding cache %s: %s", path, error)
            return None
        if embeddings.shape[0] != len(self.class_names):
            return None
        return embeddings

    def _write_cache(self, key: str, embeddings: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._cache_path(key)
        metadata = {
            "key": key,
            "arch": self.arch,
            "num_classes": str(len(self.class_names)),
            "num_templates": str(len(self.templates)),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp_name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(handle)
            try:
                save_file(
                    {"class_embeddings": embeddings.to("cpu").contiguous()}, tmp_name, metadata
                )
                os.replace(tmp_name, path)
            finally:
                if os.path.exists(tmp_name):
                    os.unlink(tmp_name)
        except OSError as error:  # a read-only cache only costs recomputation
            log.warning("could not write text-embedding cache %s: %s", path, error)


def build_clip(
    name: str,
    *,
    class_names: Sequence[str],
    sigma: float | None = None,
    templates: Sequence[str] | None = None,
    pretrained: str | os.PathLike | None = "openai",
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    quick_gelu: bool = True,
    text_batch_size: int = 256,
) -> CLIPZeroShotClassifier:
    """Build the zero-shot classifier `name` (clip-b32, clip-b16, clip-l14).

    Args:
        class_names: one readable name per label, in label order.
        sigma: unused (CLIP is not trained for a noise level); accepted for the registry.
        templates: prompt templates with "{}" for the class name; None means CLIP's
            80 ImageNet templates (callers pass the dataset's own, see
            `classifiers.datasets.dataset_templates`).
        pretrained: an open_clip pretrained tag ("openai"), a local open_clip checkpoint
            file (.safetensors, or .bin/.pt read with weights_only=True), or None for
            random initialization (tests).
        arch: open_clip architecture to use instead of the model's own (tests use a
            tiny registered config).
        weights: fine-tuned weights: a state dict of the open_clip model (`.model`),
            loaded strictly after `pretrained`.
        device: where the model runs.
        cache_dir: text-embedding cache folder (default: `default_cache_dir()`).
        quick_gelu: OpenAI's CLIP was trained with QuickGELU; open_clip's plain configs
            use GELU and only warn about the mismatch, so it is forced on by default.
    """
    del sigma
    import open_clip

    if name not in OPENAI_MODELS:
        raise ValueError(f"unknown CLIP model {name!r}; known: {', '.join(OPENAI_MODELS)}")
    arch = arch or OPENAI_MODELS[name][0]
    if templates is None:
        from .datasets import default_templates

        templates = default_templates()
    model = _create_open_clip(name, arch, pretrained, quick_gelu=quick_gelu, device=device)
    weight_files = []  # the files the weights come from, for the result's sha256
    checkpoint = None if pretrained is None else _checkpoint_file(arch, str(pretrained))
    if checkpoint is not None:
        weight_files.append(checkpoint)
    if weights is not None:
        load_classifier_weights(model, weights)
        weight_files.append(Path(weights).expanduser())
    model.eval()
    classifier = CLIPZeroShotClassifier(
        model,
        open_clip.get_tokenizer(arch),
        class_names,
        templates,
        arch=arch,
        cache_dir=cache_dir,
        text_batch_size=text_batch_size,
    )
    classifier.weight_files = weight_files or None
    return classifier.to(device)


def _checkpoint_file(arch: str, pretrained: str) -> Path | None:
    """The file open_clip read for `pretrained`: a local checkpoint, or for a pretrained tag
    the copy in the Hugging Face cache (or open_clip's URL cache); None if not found.

    Written by hand: open_clip returns no path from `create_model`. This follows the order
    of `open_clip.pretrained.download_pretrained` (the hub before the URL, a safetensors
    alternative before the file named), looking only into the caches, never the network.
    """
    import open_clip

    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    config = open_clip.get_pretrained_cfg(arch, pretrained)
    if config.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(config["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        alternative = (
            "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin"
            else filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth"))
            else None
        )
        for candidate in (alternative, filename):
            found = candidate and try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str):
                return Path(found)
        return None
    if config.get("url"):
        cached = Path("~/.cache/clip").expanduser() / Path(config["url"]).name
        return cached if cached.is_file() else None
    return None


def _create_open_clip(
    name: str,
    arch: str,
    pretrained: str | os.PathLike | None,
    *,
    quick_gelu: bool,
    device: str | torch.device,
) -> torch.nn.Module:
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"open_clip has no architecture {arch!r}")
    kwargs = dict(force_quick_gelu=quick_gelu, device=device)
    if pretrained is None:
        return open_clip.create_model(arch, pretrained=None, **kwargs)
    pretrained = str(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained in tags:
        try:
            return open_clip.create_model(arch, pretrained=pretrained, **kwargs)
        except RuntimeError as error:
            # open_clip reports a failed download as RuntimeError("Failed to download ...")
            # raised while handling the hub's own error.
            if "download" not in str(error).lower():
                raise
            message = _missing_weights_message(name, arch, pretrained, error)
            raise WeightsNotFoundError(message) from error
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{name}: {pretrained!r} is neither an open_clip pretrained tag for {arch} "
            f"(known: {', '.join(tags) or 'none'}) nor an existing checkpoint file"
        )
    try:
        return open_clip.create_model(arch, pretrained=str(path), **kwargs)
    except RuntimeError as error:  # load_state_dict: missing/unexpected keys, shapes
        raise WeightsMismatchError(
            f"{path} is not an open_clip {arch} checkpoint: {error}"
        ) from error


def _missing_weights_message(name: str, arch: str, tag: str, error: Exception) -> str:
    repo = OPENAI_MODELS.get(name, ("", ""))[1] if tag == "openai" else ""
    where = f" (Hugging Face repo {repo})" if repo else ""
    return (
        f"{name}: the weights of open_clip {arch} pretrained={tag!r}{where} are not on this "
        f"machine and cannot be downloaded ({error}). Either fill the Hugging Face cache on a "
        f"machine with network, e.g. python -c \"import open_clip; "
        f"open_clip.create_model('{arch}', pretrained='{tag}')\", and copy "
        f"~/.cache/huggingface/hub here (or set HF_HOME to a copy), or download the "
        f"checkpoint file (open_clip_model.safetensors{' from ' + repo if repo else ''}) "
        f"and pass it with --clip-checkpoint PATH (builder option pretrained=PATH)."
    )


def _checked_template(template: str) -> str:
    template = str(template).replace("{c}", "{}")  # clip-benchmark's spelling
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}': {template!r}")
    return template


def _register() -> None:
    for model_name, (arch, _) in OPENAI_MODELS.items():
        CLASSIFIERS.register(
            model_name, f"CLIP {arch} zero-shot (open_clip, OpenAI weights)"
        )(partial(build_clip, model_name))


_register()
