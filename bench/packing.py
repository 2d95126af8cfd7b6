"""PREDICT over a dataset, packed, against the per-example loop of Cohen et al.'s code.

Cohen et al.'s `predict.py` calls `Smooth.predict(x, n=100, ...)` for one example at a
time: a batch of 100 noisy copies per forward pass, whatever the model could take. Our
runner packs the draws of ten examples into a pass of 1000 (`smoothing.packing`). Both
are timed in the same process on the same examples: the digits test split with the digits
CNN, and a torchvision ResNet-18 (random weights, 10 classes) on 3x32x32 inputs. The
reference loop is written here from the paper's description (draw, classify, count,
binomial test), not copied.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from smoothing import stats
from smoothing.core import Smooth
from smoothing.runner import ResultFile, RunSettings, run

N, BATCH, ALPHA, SIGMA = 100, 1000, 0.001, 0.25


@torch.inference_mode()
def cohen_style_predict(model: torch.nn.Module, x: torch.Tensor, classes: int,
                        generator: torch.Generator) -> int:
    """One example's PREDICT the way Cohen et al.'s loop computes it: n copies per pass."""
    counts = np.zeros(classes, dtype=int)
    remaining = N
    while remaining > 0:
        size = min(BATCH, remaining)
        batch = x.repeat((size, 1, 1, 1))
        noise = torch.randn(batch.shape, generator=generator, device=x.device) * SIGMA
        votes = model(batch + noise).argmax(1).cpu().numpy()
        counts += np.bincount(votes, minlength=classes)
        remaining -= size
    return stats.predict_from_counts(counts, ALPHA)


def compare(name: str, model: torch.nn.Module, images: list[torch.Tensor], classes: int,
            device: str = "cpu") -> dict:
    model.to(device).eval()
    images = [x.to(device) for x in images]
    dataset = [(x, 0) for x in images]
    smooth = Smooth(model, classes, SIGMA)

    def packed() -> None:
        with tempfile.TemporaryDirectory() as folder:
            values = {"mode": "predict", "n": N, "alpha": ALPHA, "batch_size": BATCH}
            results = ResultFile(Path(folder) / "bench", "predict", values)
            # RunSettings packs only when asked (the CLI asks on CUDA): here it is measured
            settings = RunSettings(**values, device=device, pack=True)
            run(smooth, dataset, range(len(dataset)), results, settings, progress=False)

    def reference() -> None:
        for i, x in enumerate(images):
            generator = torch.Generator(device=device).manual_seed(i)
            cohen_style_predict(model, x, classes, generator)

    timings = {}
    for label, work in (("reference", reference), ("packed", packed)):
        work()  # warm-up
        started = time.perf_counter()
        work()
        timings[label] = time.perf_counter() - started
    return {
        "model": name, "examples": len(images), "n": N, "batch": BATCH,
        "reference_s": timings["reference"], "packed_s": timings["packed"],
        "speedup": timings["reference"] / timings["packed"],
    }


def packing_speedups(device: str = "cpu") -> list[dict]:
    from classifiers import build_classifier, build_dataset

    digits = build_dataset("digits", split="test")
    cnn = build_classifier("digits-sigma0.25", class_names=digits.classes, sigma=SIGMA)
    images = [digits[i][0] for i in range(len(digits))]
    rows = [compare("digits CNN", cnn, images, 10, device=device)]
    resnet = torchvision.models.resnet18(num_classes=10)
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))
              for i in range(40)]
    rows.append(compare("ResNet-18 3x32x32", resnet, images, 10, device=device))
    return rows


def print_packing(rows: list[dict]) -> None:
    print(f"{'predict n=100':<20} {'examples':>8} {'Cohen loop s':>12} {'packed s':>9} "
          f"{'speedup':>8} target >= 3")
    for r in rows:
        print(f"{r['model']:<20} {r['examples']:>8} {r['reference_s']:>12.2f} "
              f"{r['packed_s']:>9.2f} {r['speedup']:>8.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print_packing(packing_speedups())
