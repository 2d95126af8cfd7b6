"""Reference set synthesis from class names alone (Choi et al. 2024, Sec. 3.2; Algorithm 2,
lines 1-4; App. A.4 "Reference Set Synthesis").

For every class c and shot s, the prompt C(c) (a template with "{}" for the name) goes
through DeepFloyd IF's cascade, as in the paper: IF-I-XL (`IFPipeline`, 64 x 64) then
IF-II-L (`IFSuperResolutionPipeline`, 256 x 256). One image per class is the paper's
default (1-shot); Tab. 9 of the paper uses 4.

- Text: the prompt embedding is computed once per class with the stage-1 pipeline's
  `encode_prompt` (T5-XXL) and passed to both stages; stage 2 is loaded with
  `text_encoder=None`, as diffusers' IF documentation does, so T5 is loaded once.
  Captions are not cleaned (`encode_prompt`'s default): the prompt is used verbatim.
- Randomness: image (label, shot) draws all its noise, in both stages, from its own
  CPU `torch.Generator` seeded with `image_seed(seed, label, shot)` (numpy's
  SeedSequence with spawn key (label, shot)). The set, and any subset of it (fewer
  shots, a prefix of the label list), is reproduced by a rerun with the same settings;
  the initial noise does not depend on the device.
- Batches (`batch_size`, `--synthesis-batch`): several images (of any classes) go
  through one call of each stage, with a list of their generators, one per image
  (diffusers draws every image's noise from its own generator, the same draws as for
  the image alone). An image is then the one made alone but for the float rounding of
  batched convolutions: on the tiny CPU models of the tests, a few pixel values in a
  thousand moved by one grey level. `batch_size` is not a setting of the set, so a
  rerun with another one continues it (the bytes of images made with other batches
  may differ in that way).
- No watermark, no safety filter: both stages return tensors (`output_type="pt"`, as
  the paper's code, ChoiDae1/robustify-T2I `generate_dataset.py`, and diffusers' IF
  documentation between stages do), converted to PNG with diffusers' `pt_to_pil`. The
  IF pipelines apply their watermarker and safety checker only to PIL/NumPy output, so
  a "pil" stage 2 would stamp DeepFloyd's watermark into every reference (and the
  denoiser would learn it) and black out images the checker flags (those were dropped).
  Neither component is loaded. `nsfw_detected` stays in the manifest's records (None);
  `load_reference_set` still skips images an older manifest marks as flagged.
- Output: `OUT/images/<label:04d>/<shot:02d>.png` and `OUT/manifest.json` (classes,
  template, settings, one record per image with its prompt, seed and model ids), both
  written atomically (temporary file, then rename, mode from the umask); the manifest
  is rewritten after every batch. Resized (bicubic) to `resolution` when that differs
  from the stage-2 output size (None: kept as the cascade makes them).
- Resume: images already in OUT are kept, not regenerated; a rerun fills in missing
  ones, extends the label list (the old list must be a prefix of the new one) or adds
  shots. A rerun with other settings (template, models, seed, resolution, dtype, steps,
  guidance) refuses with `AdaptError` and changes nothing, unless `overwrite`, which
  deletes the old images and starts over.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapt.errors import AdaptError
from adapt.references import MANIFEST, check_class_names, check_template, fill_template
from adapt.training import atomic_write, package_versions, write_json

log = logging.getLogger(__name__)

DEFAULT_STAGE1 = "DeepFloyd/IF-I-XL-v1.0"
DEFAULT_STAGE2 = "DeepFloyd/IF-II-L-v1.0"
DEFAULT_TEMPLATE = "a photo of a {}."
MANIFEST_FORMAT = 1
# What a rerun that generates nothing compares before rewriting the manifest.
_CONTENT_KEYS = ("classes", "template", "shots", "seed", "models", "settings", "images")
# images/<label:04d>/<shot:02d>.png: what an overwrite may delete, and nothing else.
_IMAGE_FILE = re.compile(r"^\d{4,}$"), re.compile(r"^\d{2,}\.png$")


def image_relpath(label: int, shot: int) -> str:
    """Where image (label, shot) lives inside a reference folder."""
    return f"images/{label:04d}/{shot:02d}.png"


def image_seed(seed: int, label: int, shot: int) -> int:
    """The generator seed of image (label, shot): independent streams for every image."""
    words = np.random.SeedSequence(entropy=seed, spawn_key=(label, shot)).generate_state(
        2, dtype=np.uint32
    )
    # 63 bits: torch.Generator.manual_seed takes any of them.
    return (int(words[0]) << 31) ^ int(words[1])


def synthesize(
    classes: Sequence[str],
    out: str | os.PathLike,
    template: str = DEFAULT_TEMPLATE,
    shots: int = 1,
    stage1: str | os.PathLike = DEFAULT_STAGE1,
    stage2: str | os.PathLike = DEFAULT_STAGE2,
    resolution: int | None = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    steps1: int | None = None,
    steps2: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    *,
    variant: str | None = None,
    batch_size: int = 1,
    overwrite: bool = False,
) -> Path:
    """Generate `shots` reference images per class into `out`; return `out`.

    Args:
        classes: class names in label order.
        out: the reference folder (created; resumed if it holds this run already).
        template: prompt template C(.) with one "{}" for the class name.
        shots: images per class (the paper: 1).
        stage1, stage2: IF-I and IF-II checkpoints, hub ids or save_pretrained folders.
        resolution: side of the saved square images (the cascade makes 256 x 256; None:
            keep the cascade's size).
        seed: base seed; image (label, shot) uses `image_seed(seed, label, shot)`.
        device, dtype: where and in which precision (fp32, fp16, bf16) the models run.
        steps1, steps2: denoising steps of each stage (None: the pipelines' defaults,
            100 and 50).
        guidance_scale: classifier-free guidance weight for both stages (None: the
            pipelines' defaults, 7.0 and 4.0; <= 1 turns guidance off).
        progress: show a progress bar over the images.
        variant: checkpoint file variant to load (e.g. "fp16" for DeepFloyd's
            half-precision files, `*.fp16.safetensors`).
        batch_size: images per pipeline call (memory and speed only).
        overwrite: replace a reference set made with other settings.
    """
    from denoisers.registry import dtype_name, parse_dtype

    classes = check_class_names(classes)
    template = check_template(template)
    checked = [("shots", shots, 1), ("seed", seed, 0), ("batch_size", batch_size, 1)]
    if resolution is not None:
        checked.append(("resolution", resolution, 8))
    for name, value, minimum in checked:
        if isinstance(value, bool) or int(value) != value or value < minimum:
            raise AdaptError(f"{name} must be an integer >= {minimum}, got {value}")
    for name, value in (("steps1", steps1), ("steps2", steps2)):
        if value is not None and (int(value) != value or value < 1):
            raise AdaptError(f"{name} must be an integer >= 1, got {value}")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise AdaptError(f"guidance_scale must be >= 0, got {guidance_scale}")
    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)

    settings = _settings(
        template=template, stage1=str(stage1), stage2=str(stage2), seed=int(seed),
        resolution=None if resolution is None else int(resolution),
        dtype=dtype_name(torch_dtype), variant=variant,
        steps1=steps1, steps2=steps2, guidance_scale=guidance_scale,
    )
    out = Path(out).expanduser()
    previous = _previous_manifest(out, settings, classes, overwrite)

    records: dict[tuple[int, int], dict[str, Any]] = {}
    if previous is not None and not overwrite:
        for record in previous["images"]:
            key = (int(record["label"]), int(record["shot"]))
            if key[0] < len(classes) and key[1] < shots and (out / record["path"]).is_file():
                records[key] = record
    wanted = [(label, shot) for label in range(len(classes)) for shot in range(shots)]
    for label, shot in wanted:
        # An image written just before an interruption, whose record was not: the file
        # is complete (atomic write) and a function of the settings, so it is kept.
        if (label, shot) not in records and not overwrite:
            if (out / image_relpath(label, shot)).is_file():
                records[(label, shot)] = _record(classes, label, shot, settings, None, None)
    missing = [key for key in wanted if key not in records]

    def manifest() -> dict[str, Any]:
        return _manifest(classes, shots, settings, records)

    if not missing:
        current = manifest()
        if previous is None or any(previous.get(k) != current[k] for k in _CONTENT_KEYS):
            write_json(out / MANIFEST, current)
        log.info("%s: all %d images present, nothing to generate", out, len(wanted))
        return out

    pipe1, pipe2 = _load_pipelines(
        stage1, stage2, torch_dtype=torch_dtype, variant=variant, device=device
    )
    if overwrite:
        _remove_old_images(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, manifest())
    log.info("%s: %d images present, generating %d", out, len(records), len(missing))

    from diffusers.utils import pt_to_pil
    from tqdm.auto import tqdm

    g1, g2 = settings["stage1_guidance_scale"], settings["stage2_guidance_scale"]
    guided = g1 > 1.0 or g2 > 1.0
    embeddings: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def embed(label: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Once per class (T5-XXL), however many of its shots are made.
        if label not in embeddings:
            with torch.no_grad():
                embeddings[label] = pipe1.encode_prompt(
                    fill_template(template, classes[label]), do_classifier_free_guidance=guided,
                    device=device,
                )
        return embeddings[label]

    bar = tqdm(total=len(missing), desc="synthesize", unit="image", disable=not progress)
    try:
        for first in range(0, len(missing), batch_size):
            batch = missing[first : first + batch_size]
            bar.set_postfix_str(classes[batch[0][0]][:30])
            pairs = [embed(label) for label, _ in batch]
            embeds = torch.cat([positive for positive, _ in pairs])
            negative = None if pairs[0][1] is None else torch.cat([n for _, n in pairs])
            generators = [
                torch.Generator("cpu").manual_seed(image_seed(seed, label, shot))
                for label, shot in batch
            ]
            low = pipe1(
                prompt_embeds=embeds, negative_prompt_embeds=negative,
                num_inference_steps=settings["stage1_steps"], guidance_scale=g1,
                generator=generators, output_type="pt",
            ).images
            # Tensors, not "pil": the pipeline would watermark them and run its safety
            # checker (see the module docstring).
            high = pipe2(
                image=low, prompt_embeds=embeds, negative_prompt_embeds=negative,
                num_inference_steps=settings["stage2_steps"], guidance_scale=g2,
                noise_level=settings["stage2_noise_level"], generator=generators,
                output_type="pt",
            ).images
            for (label, shot), image in zip(batch, pt_to_pil(high), strict=True):
                record = _record(classes, label, shot, settings, None, str(device))
                _write_image(out / record["path"], image, resolution, record)
                records[(label, shot)] = record
            write_json(out / MANIFEST, manifest())
            bar.update(len(batch))
    finally:
        bar.close()
    return out


# -- settings and manifest ---------------------------------------------------------------


def _pipeline_default(pipeline_class: Any, argument: str) -> Any:
    return inspect.signature(pipeline_class.__call__).parameters[argument].default


def _settings(
    *, template: str, stage1: str, stage2: str, seed: int, resolution: int, dtype: str,
    variant: str | None, steps1: int | None, steps2: int | None,
    guidance_scale: float | None,
) -> dict[str, Any]:
    """Everything that decides the images, with the pipelines' defaults made explicit."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    def default(value: Any, pipeline_class: Any, argument: str) -> Any:
        return _pipeline_default(pipeline_class, argument) if value is None else value

    return {
        "template": template,
        "stage1": stage1,
        "stage2": stage2,
        "seed": seed,
        "resolution": resolution,
        "dtype": dtype,
        "variant": variant,
        "stage1_steps": int(default(steps1, IFPipeline, "num_inference_steps")),
        "stage2_steps": int(default(steps2, IFSuperResolutionPipeline, "num_inference_steps")),
        "stage1_guidance_scale": float(default(guidance_scale, IFPipeline, "guidance_scale")),
        "stage2_guidance_scale": float(
            default(guidance_scale, IFSuperResolutionPipeline, "guidance_scale")
        ),
        "stage2_noise_level": int(_pipeline_default(IFSuperResolutionPipeline, "noise_level")),
    }


def _record(
    classes: Sequence[str], label: int, shot: int, settings: dict[str, Any],
    nsfw: bool | None, device: str | None,
) -> dict[str, Any]:
    return {
        "path": image_relpath(label, shot),
        "class": classes[label],
        "label": label,
        "shot": shot,
        "prompt": fill_template(settings["template"], classes[label]),
        "seed": image_seed(settings["seed"], label, shot),
        "models": {"stage1": settings["stage1"], "stage2": settings["stage2"]},
        "nsfw_detected": nsfw,
        "device": device,  # None: found on disk without its record (written, then interrupted)
    }


def _manifest(
    classes: Sequence[str], shots: int, settings: dict[str, Any],
    records: dict[tuple[int, int], dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "written_by": "robustify adapt synthesize",
        "classes": list(classes),
        "template": settings["template"],
        "shots": shots,
        "seed": settings["seed"],
        "models": {"stage1": settings["stage1"], "stage2": settings["stage2"]},
        "settings": settings,
        "versions": package_versions(),
        "images": [records[key] for key in sorted(records)],
    }


def _previous_manifest(
    out: Path, settings: dict[str, Any], classes: list[str], overwrite: bool
) -> dict[str, Any] | None:
    """The manifest already in `out` if this run may continue it; refuse other runs' folders."""
    if out.exists() and not out.is_dir():
        raise AdaptError(f"output {out} exists and is not a folder")
    if not out.is_dir():
        return None
    path = out / MANIFEST
    if not path.exists():
        # Empty folders do not count: an overwrite interrupted right after deleting the
        # old images leaves images/NNNN/ behind.
        if any(p.is_file() for p in out.rglob("*")) and not overwrite:
            raise AdaptError(
                f"output folder {out} is not empty and holds no {MANIFEST} of `adapt "
                "synthesize`; choose a new or empty folder (or pass --overwrite to write the "
                "reference set among its files)"
            )
        return None
    previous = _read_json(path)
    if overwrite:
        return previous
    if not isinstance(previous, dict) or not isinstance(previous.get("settings"), dict):
        raise AdaptError(
            f"{path} is not a manifest of `adapt synthesize` (or is damaged); choose another "
            "output folder, or pass --overwrite to replace it"
        )
    old_settings = previous["settings"]
    differing = sorted(
        key for key in set(settings) | set(old_settings)
        if settings.get(key) != old_settings.get(key)
    )
    if differing:
        shown = "; ".join(
            f"{key}: {old_settings.get(key)!r} there, {settings.get(key)!r} now"
            for key in differing
        )
        raise AdaptError(
            f"{out} holds a reference set made with other settings ({shown}). Nothing was "
            "changed; choose another output folder, or pass --overwrite to regenerate it"
        )
    old_classes = previous.get("classes")
    if not isinstance(old_classes, list) or classes[: len(old_classes)] != old_classes:
        raise AdaptError(
            f"{out} holds a reference set for other classes ({_shown(old_classes)} there, "
            f"{_shown(classes)} now). A rerun may only add classes after the existing ones; "
            "nothing was changed. Choose another output folder, or pass --overwrite"
        )
    if not isinstance(previous.get("images"), list):
        raise AdaptError(f"{path} has no image list; pass --overwrite to regenerate the set")
    return previous


def _shown(names: Any) -> str:
    if not isinstance(names, list):
        return repr(names)
    head = ", ".join(repr(n) for n in names[:4])
    return f"{len(names)} classes: {head}{', ...' if len(names) > 4 else ''}"


def _remove_old_images(out: Path) -> None:
    """Delete the files of an earlier set (images/NNNN/NN.png) and its manifest, only those."""
    images = out / "images"
    if images.is_dir():
        for folder in images.iterdir():
            if folder.is_dir() and _IMAGE_FILE[0].match(folder.name):
                for file in folder.iterdir():
                    if file.is_file() and _IMAGE_FILE[1].match(file.name):
                        file.unlink()
    (out / MANIFEST).unlink(missing_ok=True)


# -- files ----------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _write_image(
    path: Path, image: Any, resolution: int | None, record: dict[str, Any]
) -> None:
    from PIL import Image, PngImagePlugin

    image = image.convert("RGB")
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    # The provenance travels with the file when it is copied out of the set.
    info = PngImagePlugin.PngInfo()
    for key in ("prompt", "seed", "class", "label", "shot"):
        info.add_text(key, str(record[key]))
    info.add_text("models", json.dumps(record["models"]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write(path, buffer.getvalue())


# -- models ---------------------------------------------------------------------------------


def _load_pipelines(
    stage1: str | os.PathLike, stage2: str | os.PathLike, *, torch_dtype: torch.dtype,
    variant: str | None, device: torch.device,
) -> tuple[Any, Any]:
    from diffusers import IFPipeline, IFSuperResolutionPipeline
    from transformers import T5Tokenizer

    from denoisers.if2 import _HOW_TO_GET_IF
    from denoisers.registry import dtype_kwargs, load_checkpoint, load_tokenizer

    common = {
        "use_safetensors": True, "variant": variant, **dtype_kwargs(torch_dtype),
        # Tensor output never runs them (see the module docstring): not loaded.
        "safety_checker": None, "feature_extractor": None, "watermarker": None,
        "requires_safety_checker": False,
    }
    what1, what2 = "IF-I model (synthesis stage 1)", "IF-II model (synthesis stage 2)"

    # The tokenizers load on their own so that one that cannot be read (the hub's slow
    # T5 tokenizer without sentencepiece/protobuf) is named as such.
    def load1(path: str) -> Any:
        tokenizer = load_tokenizer(T5Tokenizer, path, what=what1)
        return IFPipeline.from_pretrained(path, tokenizer=tokenizer, **common)

    def load2(path: str) -> Any:
        # Stage 2 reuses stage 1's prompt embeddings: its own T5 copy is not loaded.
        tokenizer = load_tokenizer(T5Tokenizer, path, what=what2)
        return IFSuperResolutionPipeline.from_pretrained(
            path, text_encoder=None, tokenizer=tokenizer, **common
        )

    pipe1 = load_checkpoint(
        load1, stage1, what=what1, how_to_get=_HOW_TO_GET_IF.format(name=str(stage1)),
        variant=variant,
    )
    if pipe1.text_encoder is None or pipe1.tokenizer is None:
        raise AdaptError(f"{stage1} has no text encoder/tokenizer to embed the prompts with")
    pipe2 = load_checkpoint(
        load2, stage2, what=what2, how_to_get=_HOW_TO_GET_IF.format(name=str(stage2)),
        variant=variant,
    )
    hidden = pipe1.text_encoder.config.d_model
    expected = pipe2.unet.config.encoder_hid_dim
    if expected is not None and expected != hidden:
        raise AdaptError(
            f"stage 2 {stage2} expects text embeddings of width {expected}, but stage 1 "
            f"{stage1}'s text encoder makes {hidden}: use the stage-1/stage-2 checkpoints of "
            "one DeepFloyd IF release"
        )
    for pipeline in (pipe1, pipe2):
        pipeline.set_progress_bar_config(disable=True)  # one bar over images instead
        pipeline.to(device)
    return pipe1, pipe2
