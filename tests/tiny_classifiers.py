"""Tiny classifiers of the real classes, and tiny reference sets, for `adapt`'s tests.

- `save_tiny_clip(dir, seed)`: registers the tiny open_clip config of tests/test_clip.py
  (ViT width 64, 2 layers, 32x32 images; the real BPE tokenizer) and saves a randomly
  initialised model as safetensors; `clip_options(...)` are the `build_classifier`
  options that load it as "clip-b32" (the path a user takes with a local checkpoint).
- `save_tiny_resnet(path, num_classes, seed)`: a torchvision ResNet-18 with a head for
  `num_classes`, random weights, saved as the state dict `--classifier-weights` reads;
  `build_classifier("resnet18", class_names=..., weights=path)` loads it.
- `write_reference_set(dir, classes, ...)`: random images in the layout `adapt
  synthesize` writes (manifest.json + images/<label:04d>/<shot:02d>.png).
- `snapshot(dir)`: bytes and modification times of every file below a folder, to check
  that a refused run left an output folder untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.test_clip import TINY_ARCH, TINY_CONFIG

CLIP_TEMPLATES = ["a photo of a {}.", "art of a {}"]


def register_tiny_clip(folder: str | Path) -> str:
    """Make the tiny config known to open_clip (idempotent); return its architecture name."""
    import open_clip

    config = Path(folder) / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    return TINY_ARCH


def tiny_clip_model(seed: int = 0) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(TINY_ARCH, pretrained=None, force_quick_gelu=True).eval()


def save_tiny_clip(folder: str | Path, *, seed: int = 0) -> Path:
    """Register the tiny CLIP config and save a model with these random weights."""
    from classifiers.weights_io import save_classifier_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    register_tiny_clip(folder)
    return save_classifier_weights(tiny_clip_model(seed), folder / "tiny_clip.safetensors")


def clip_options(checkpoint: str | Path, cache_dir: str | Path) -> dict:
    """`build_classifier("clip-b32", ...)` options for the tiny CLIP saved at `checkpoint`."""
    return {
        "pretrained": str(checkpoint),
        "arch": TINY_ARCH,
        "cache_dir": str(cache_dir),
        "templates": list(CLIP_TEMPLATES),
    }


def save_tiny_resnet(path: str | Path, num_classes: int, *, seed: int = 0) -> Path:
    """A random torchvision ResNet-18 with `num_classes` outputs, saved as safetensors."""
    import torchvision

    from classifiers.weights_io import save_classifier_weights

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return save_classifier_weights(model, Path(path))


def write_reference_set(
    folder: str | Path,
    classes: list[str],
    *,
    shots: int = 1,
    size: int = 32,
    seed: int = 0,
    template: str = "a photo of a {}.",
) -> Path:
    """Random RGB images per class in the `adapt synthesize` layout; return the folder."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    records = []
    for label, name in enumerate(classes):
        for shot in range(shots):
            relative = Path("images") / f"{label:04d}" / f"{shot:02d}.png"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            # Smooth-ish images (a colour gradient plus noise), so denoising has structure.
            ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(0, 1, (1, 1, 3))
            pixels = np.clip(ramp + 0.2 * rng.standard_normal((size, size, 3)), 0, 1)
            Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / relative)
            records.append(
                {
                    "path": relative.as_posix(),
                    "class": name,
                    "label": label,
                    "shot": shot,
                    "prompt": template.replace("{}", name),
                    "seed": seed + label,
                    "models": {"stage1": "test", "stage2": "test"},
                }
            )
    manifest = {"classes": list(classes), "template": template, "images": records}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification times of every file under `folder`."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }
