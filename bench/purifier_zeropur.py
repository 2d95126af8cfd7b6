"""Per-image cost of ZeroPur against one forward pass of the classifier it defends (CPU).

    python -m bench.purifier_zeropur [--repeats 5] [--threads 1] [--batch-size 16]

ZeroPur has no network of its own: each of its T_g + T_p signed steps runs the
classifier forward (Guided Shift: twice, the image and its blurred copy) and backward,
so its cost is a multiple of the classifier's. Measured on two classifiers:

- `digits-clean`, the shipped digits CNN (1x8x8), with the digits defaults;
- torchvision's ResNet-18 class (random weights, 3x32x32 inputs: the authors' CIFAR
  architecture, `NormalizedClassifier` around it), with the authors' layers (embedding
  `avgpool`, S = layer3, layer4, phi = layer1..layer4).

Both with the default 10 + 50 steps, evaluation only (no_grad outside the purifier, the
forward of every gradient mode is the same). Each time is the median of `--repeats`,
the two pieces of work interleaved (`bench.run.interleaved_medians`).
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

from bench.run import interleaved_medians

RESNET_LAYERS = {
    "embedding_layer": "model.avgpool",
    "feature_layers": ["model.layer3", "model.layer4"],
    "perceptual_layers": ["model.layer1", "model.layer2", "model.layer3", "model.layer4"],
}


def _models(name: str) -> tuple[torch.nn.Module, torch.nn.Module, tuple[int, ...]]:
    from classifiers.digits import CLASS_NAMES
    from classifiers.registry import CLASSIFIERS
    from denoisers.purifiers import build_purifier

    if name == "digits-clean":
        classifier = CLASSIFIERS.build("digits-clean", class_names=CLASS_NAMES)
        options: dict[str, Any] = {}
        shape: tuple[int, ...] = (1, 8, 8)
    else:
        classifier = CLASSIFIERS.build(
            "resnet18", class_names=[str(i) for i in range(1000)], pretrained=None
        ).eval()
        options, shape = dict(RESNET_LAYERS), (3, 32, 32)
    purified = build_purifier("zeropur", classifier=classifier, gradient="bpda", **options)
    return classifier, purified, shape


def bench_zeropur(repeats: int = 5, batch_size: int = 16, threads: int = 1) -> list[dict]:
    """Seconds per image of the classifier and of ZeroPur + classifier, and their ratio."""
    torch.set_num_threads(threads)
    rows = []
    for name in ("digits-clean", "resnet18-32px"):
        classifier, purified, shape = _models(name)
        x = torch.rand(batch_size, *shape, generator=torch.Generator().manual_seed(0))

        def plain(classifier=classifier, x=x):
            with torch.no_grad():
                return classifier(x)

        def defended(purified=purified, x=x):
            with torch.no_grad():
                return purified(x)

        plain_s, defended_s = interleaved_medians([plain, defended], repeats)
        rows.append({
            "classifier": name,
            "batch_size": batch_size,
            "classifier_ms_per_image": 1e3 * plain_s / batch_size,
            "zeropur_ms_per_image": 1e3 * defended_s / batch_size,
            "ratio": defended_s / plain_s,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    args = parser.parse_args()
    rows = bench_zeropur(args.repeats, args.batch_size, args.threads)
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "rows": rows}, indent=2))
        return
    print("| classifier | batch | classifier ms/image | ZeroPur + classifier ms/image | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['classifier']} | {row['batch_size']} | "
              f"{row['classifier_ms_per_image']:.3f} | {row['zeropur_ms_per_image']:.2f} | "
              f"{row['ratio']:.0f}x |")


if __name__ == "__main__":
    main()
