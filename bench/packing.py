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
from collections.abc import Callable
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
            repeats: int = 3, device: str = "cpu") -> dict:
    """Seconds for PREDICT over `images`: Cohen's loop, our runner unpacked and packed, and
    the model's passes alone on the same noisy inputs at batch N and at BATCH (the floor
    under any engine: nothing that feeds this model can be faster than its passes)."""
    from bench.run import interleaved_medians

    model.to(device).eval()
    images = [x.to(device) for x in images]
    dataset = [(x, 0) for x in images]
    smooth = Smooth(model, classes, SIGMA)

    def runner(pack: bool) -> Callable[[], None]:
        values = {"mode": "predict", "n": N, "alpha": ALPHA, "batch_size": BATCH}
        # RunSettings packs only when asked (the CLI asks on CUDA); a bench of packing that
        # does not pack would measure nothing (it once did)
        settings = RunSettings(**values, device=device, pack=pack)
        assert settings.examples_per_pass() == (BATCH // N if pack else 1)

        def work() -> None:
            with tempfile.TemporaryDirectory() as folder:
                results = ResultFile(Path(folder) / "bench", "predict", values)
                run(smooth, dataset, range(len(dataset)), results, settings, progress=False)
        return work

    def reference() -> None:
        for i, x in enumerate(images):
            generator = torch.Generator(device=device).manual_seed(i)
            cohen_style_predict(model, x, classes, generator)

    noisy = torch.cat([x.repeat((N, 1, 1, 1)) for x in images])
    noise = torch.randn(noisy.shape, generator=torch.Generator().manual_seed(0)) * SIGMA
    noisy += noise.to(device)

    def passes(batch: int) -> Callable[[], None]:
        @torch.inference_mode()
        def work() -> None:
            for chunk in noisy.split(batch):
                model(chunk).argmax(1)
        return work

    works = {"reference": reference, "unpacked": runner(False), "packed": runner(True),
             f"passes_{N}": passes(N), f"passes_{BATCH}": passes(BATCH)}
    seconds = dict(zip(works, interleaved_medians(list(works.values()), repeats), strict=True))
    floor = min(seconds[f"passes_{N}"], seconds[f"passes_{BATCH}"])
    return {
        "model": name, "examples": len(images), "n": N, "batch": BATCH,
        **{f"{k}_s": v for k, v in seconds.items()},
        "speedup": seconds["reference"] / seconds["packed"],
        "speedup_unpacked": seconds["reference"] / seconds["unpacked"],
        # the most any engine could gain over the reference with this model on this device
        "speedup_bound": seconds["reference"] / floor,
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
    print(f"{'predict n=100':<20} {'examples':>8} {'Cohen loop s':>12} {'unpacked s':>10} "
          f"{'packed s':>9} {'speedup':>8} {'bound':>6}  (target >= 3; bound: the model's "
          f"passes alone at the better of batch {N} and {BATCH})")
    for r in rows:
        print(f"{r['model']:<20} {r['examples']:>8} {r['reference_s']:>12.2f} "
              f"{r['unpacked_s']:>10.2f} {r['packed_s']:>9.2f} {r['speedup']:>8.2f} "
              f"{r['speedup_bound']:>6.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print_packing(packing_speedups())
