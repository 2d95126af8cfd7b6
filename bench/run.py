"""`make bench`: engine overhead of CERTIFY against forward passes alone, in one process.

For each model, time `Smooth.certify(x, n0=100, n=10_000)` and the classifier's
forward passes alone on the same number of noisy inputs made beforehand, at the
same batch size. Their ratio is the cost of the engine (noise, counting,
statistics); the target is <= 1.05. Each figure is the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from classifiers import build_classifier
from smoothing.core import Smooth

N0, N = 100, 10_000


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def engine_overhead(
    name: str, model: torch.nn.Module, shape: tuple[int, ...], classes: int, batch: int,
    sigma: float, repeats: int,
) -> dict:
    model.eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    smooth = Smooth(model, classes, sigma)
    certify = median_seconds(
        lambda: smooth.certify(x, N0, N, 0.001, batch, torch.Generator().manual_seed(1)), repeats
    )
    # the same draws, made beforehand, so only the forward passes are timed
    batches = [
        x + sigma * torch.randn((size, *shape), generator=torch.Generator().manual_seed(size))
        for total in (N0, N)
        for size in [batch] * (total // batch) + ([total % batch] if total % batch else [])
    ]

    @torch.inference_mode()
    def forward_only() -> None:
        for noisy in batches:
            model(noisy)

    forward = median_seconds(forward_only, repeats)
    return {
        "model": name, "input": list(shape), "batch": batch, "n0": N0, "n": N,
        "certify_s": round(certify, 4), "forward_only_s": round(forward, 4),
        "ratio": round(certify / forward, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)  # only the random init of the ResNet; the engine uses its generators

    digits = build_classifier("digits", class_names=[str(i) for i in range(10)], sigma=0.25)
    resnet = torchvision.models.resnet18(num_classes=10)
    rows = [
        engine_overhead("digits CNN", digits, (1, 8, 8), 10, 1000, 0.25, args.repeats),
        engine_overhead("ResNet-18", resnet, (3, 32, 32), 10, 400, 0.25, max(1, args.repeats // 2)),
    ]
    record = {
        "what": "certify time / forward-only time, same process, same batches (median)",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'model':<12} {'input':<10} {'batch':>5} {'certify s':>10} "
          f"{'forward s':>10} {'ratio':>6}")
    for r in rows:
        shape = "x".join(map(str, r["input"]))
        print(f"{r['model']:<12} {shape:<10} {r['batch']:>5} {r['certify_s']:>10.3f} "
              f"{r['forward_only_s']:>10.3f} {r['ratio']:>6.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
