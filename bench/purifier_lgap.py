"""Per-image cost of LGAP (seed 001) against one forward pass of its classifier, on the CPU.

    python -m bench.purifier_lgap [--batch 4] [--repeats 5] [--threads 1] [--steps 50]

Builds the tests' tiny BLIP and tiny Stable Diffusion img2img pipeline
(tests/tiny_purifier_models_lgap.py: random weights, the real classes) and a torchvision
ResNet-18 (random weights, 10 classes) on 32 x 32 RGB images (CIFAR's size, purified at
their own size), with the paper's / diffusers' defaults otherwise: strength 0.5, 50
inference steps (25 denoising steps), guidance 7.5 (two UNet evaluations per step), BLIP
beam search 3 / 20 / 5. Times, interleaved and the median of `--repeats`
(`bench.run.interleaved_medians`), per image:

- the classifier's forward pass alone;
- the purified model's forward pass (caption + img2img + classifier), and its parts:
  the caption alone, the img2img pass alone (caption given);
- the exact gradient (forward and backward through img2img) against the classifier's
  forward and backward.

Tiny-model figures: they count LGAP's network evaluations (1 BLIP beam search, a VAE
encode and decode, 2 x int(steps x strength) UNet calls) at toy sizes, not what BLIP-base
and Stable Diffusion v1.5 at 512 x 512 cost on a GPU. Prints a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch


def measure(batch: int = 4, repeats: int = 5, threads: int = 1, steps: int = 50) -> dict:
    """Median seconds per image of each piece of work (see the module docstring)."""
    import torchvision

    from bench.run import interleaved_medians
    from denoisers.purifiers import build_purifier
    from tests.tiny_purifier_models_lgap import save_tiny_blip, save_tiny_sd

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        blip = save_tiny_blip(Path(folder) / "blip")
        sd = save_tiny_sd(Path(folder) / "sd")
        torch.manual_seed(0)
        classifier = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        model = build_purifier(
            "lgap", classifier=classifier, caption_checkpoint=str(blip),
            ldm_checkpoint=str(sd), num_inference_steps=steps, resolution=None,
        )
    purifier = model.purifier
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captions = purifier.caption(x)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    def classify() -> None:
        with torch.no_grad():
            classifier(x)

    def purified_forward() -> None:
        model.generator = seeded()
        with torch.no_grad():
            model(x)

    def caption() -> None:
        purifier.caption(x)

    def img2img() -> None:
        with torch.no_grad():
            purifier.purify(x, seeded(), captions=captions)

    def classifier_gradient() -> None:
        inputs = x.clone().requires_grad_(True)
        torch.autograd.grad(classifier(inputs)[:, 0].sum(), inputs)

    def exact_gradient() -> None:
        model.generator = seeded()
        inputs = x.clone().requires_grad_(True)
        torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)

    works = [classify, purified_forward, caption, img2img, classifier_gradient, exact_gradient]
    seconds = interleaved_medians(works, repeats)
    per_image = {work.__name__: spent / batch for work, spent in zip(works, seconds, strict=True)}
    return {
        "per_image_seconds": per_image,
        "forward_ratio": per_image["purified_forward"] / per_image["classify"],
        "gradient_ratio": per_image["exact_gradient"] / per_image["classifier_gradient"],
        "settings": {**model.settings, "batch": batch, "repeats": repeats, "threads": threads,
                     "image": [3, 32, 32], "classifier": "torchvision resnet18 (random)"},
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    result = measure(args.batch, args.repeats, args.threads, args.steps)
    times = result["per_image_seconds"]
    print("| work | ms per image | x classifier forward |")
    print("| --- | ---: | ---: |")
    for name, spent in times.items():
        print(f"| {name} | {1000 * spent:.2f} | {spent / times['classify']:.1f} |")
    print(f"\nexact gradient / classifier gradient: {result['gradient_ratio']:.1f}")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
