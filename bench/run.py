"""`make bench`: where the time goes, measured as ratios within one process.

1. Engine overhead. For each model, time `Smooth.certify(x, n0=100, n=10_000)` and the
   classifier's forward passes alone on the same number of noisy inputs made
   beforehand, at the same batch size. Their ratio is the cost of the engine (noise,
   counting, statistics); the target is <= 1.05.
2. Denoised smoothing. `DenoiseAndClassify` with a tiny IF-II and a tiny CLIP (the
   test suite's models, same classes as the real checkpoints) at batch 32: the time
   of the whole base classifier against the denoiser alone and the classifier alone on
   the same batch. The share outside the two networks (timestep and prompt-embedding
   plumbing, scaling, padding, clipping) has a target below 5%. In the same interleaved
   loop, the pipeline split into micro-batches of batch/4 against one big batch (target
   <= 1.02; this includes the networks' own lower efficiency at a smaller batch), and
   against the same chunks passed to the unsplit pipeline one by one (the split's own
   plumbing: slicing, the loop, the concatenation).
3. Engine memory. The peak of `Smooth.certify` on the digits input (1x8x8, batch 1000)
   at growing n, each in a fresh process: the bytes of live tensors (counted op by op,
   `tests.tensor_memory`) and the growth of the process's peak RSS during the call. The
   digits CNN up to n = 10^6; n = 10^8 (10^4 s of the CNN) with a classifier that costs
   nothing (its logits are ten noisy pixels), so that only the engine runs.
4. Fewer forward passes (counts, not seconds): samples drawn by `certify --sequential` at
   the grid 0, 0.25, ..., 1.0 against CERTIFY at n = 10,000 (`bench.sequential`, target
   <= 1/5), and the forward passes of `certify --early-exit` against the full run
   (`bench.early_exit`), with identical analyze output.
5. Packing: PREDICT n = 100 over the digits test split and a ResNet-18 at 3x32x32, the
   runner packing ten examples per pass against Cohen et al.'s per-example loop
   (`bench.packing`).

Each timing is the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from bench.noise import noise_cost
from classifiers import build_classifier
from smoothing.core import Smooth

N0, N = 100, 10_000


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(works: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each piece of work, timed in turn within each repeat, so that
    a change in the machine's load falls on all of them alike."""
    for work in works:
        work()  # warm-up
    times: list[list[float]] = [[] for _ in works]
    for _ in range(repeats):
        for work, spent in zip(works, times, strict=True):
            synchronize()
            started = time.perf_counter()
            work()
            synchronize()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def engine_overhead(
    name: str, model: torch.nn.Module, shape: tuple[int, ...], classes: int, batch: int,
    sigma: float, repeats: int, calls: int = 1,
) -> dict:
    """Median time of `calls` certify calls against their forward passes alone (a small
    model takes several calls per timing, so that each lasts long enough to measure)."""
    model.eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    smooth = Smooth(model, classes, sigma)
    # the same number of draws, made beforehand, so only the forward passes are timed
    batches = [
        x + sigma * torch.randn((size, *shape), generator=torch.Generator().manual_seed(size))
        for total in (N0, N)
        for size in [batch] * (total // batch) + ([total % batch] if total % batch else [])
    ]

    @torch.inference_mode()
    def forward_only() -> None:
        for noisy in batches:
            model(noisy)

    def certify_all() -> None:
        for call in range(calls):
            smooth.certify(x, N0, N, 0.001, batch, torch.Generator().manual_seed(call))

    def forward_all() -> None:
        for _ in range(calls):
            forward_only()

    certify, forward = interleaved_medians([certify_all, forward_all], repeats)
    return {
        "model": name, "input": list(shape), "batch": batch, "n0": N0, "n": N,
        "calls_per_timing": calls,
        "certify_s": round(certify, 4), "forward_only_s": round(forward, 4),
        "ratio": round(certify / forward, 4),
    }


def denoised_smoothing_split(
    batch: int, sigma: float, repeats: int, *, device: str = "cpu", dtype: str = "fp32",
    if2: str | None = None, classifier_name: str | None = None, size: int = 32,
    micro_batch: int | None = None,
) -> dict:
    """Per-sample time of DenoiseAndClassify(IF-II, CLIP), split by network, and of the
    same pipeline in micro-batches of `micro_batch` (default batch/4).

    With `if2`/`classifier_name` left out, the test suite's tiny IF-II and tiny CLIP
    (CPU-sized); give `--if2 DeepFloyd/IF-II-L-v1.0 --classifier clip-b32 --size 224
    --device cuda --dtype fp16` for the real checkpoints on a GPU.
    """
    from classifiers.datasets import dataset_class_names
    from denoisers import DENOISERS, DenoiseAndClassify
    from denoisers.if2 import predict_noise

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        if if2 is None or classifier_name is None:
            from tests.tiny_classifiers import clip_options, save_tiny_clip
            from tests.tiny_models import save_tiny_if2
        if if2 is None:
            if2 = str(save_tiny_if2(root / "if2"))
            denoiser_label = "tiny IF-II"
        else:
            denoiser_label = if2
        denoiser = DENOISERS.build("if2", sigma=sigma, checkpoint=if2, device=device,
                                   dtype=dtype)
        if classifier_name is None:
            options = clip_options(save_tiny_clip(root / "clip"), root / "cache")
            classifier = build_classifier("clip-b32", class_names=["cat", "dog", "car"],
                                          **options)
            classifier_label = "tiny CLIP"
        else:
            classifier = build_classifier(classifier_name, device=device,
                                          class_names=dataset_class_names("imagenet"))
            classifier_label = classifier_name
    denoiser = denoiser.to(device).eval()
    classifier = classifier.to(device).eval()
    model = DenoiseAndClassify(denoiser, classifier, sigma).eval()
    micro_batch = micro_batch or max(1, batch // 4)
    split = DenoiseAndClassify(denoiser, classifier, sigma, micro_batch=micro_batch).eval()
    generator = torch.Generator().manual_seed(0)
    noisy = torch.rand((batch, 3, size, size), generator=generator)
    noisy = (noisy + sigma * torch.randn(noisy.shape, generator=generator)).to(device)
    with torch.inference_mode():
        denoised = denoiser(noisy, sigma)

    # the UNet call alone, on the inputs the denoiser would build (Eq. 9)
    x_t = (denoiser.sqrt_alpha * (2.0 * noisy - 1.0)).to(denoiser.unet.dtype)
    timesteps = denoiser._timestep.expand(batch)
    levels = denoiser._class_label.expand(batch)

    with torch.inference_mode():
        whole, denoise, unet, classify, micro, chunks = interleaved_medians(
            [
                lambda: model(noisy),
                lambda: denoiser(noisy, sigma),
                lambda: predict_noise(denoiser.unet, x_t, timesteps, levels,
                                      denoiser.prompt_embeds),
                lambda: classifier(denoised),
                lambda: split(noisy),
                # the same chunks through the unsplit pipeline: what the split adds itself
                lambda: torch.cat([model(chunk) for chunk in noisy.split(micro_batch)]),
            ],
            repeats,
        )
    return {
        "model": f"DenoiseAndClassify({denoiser_label}, {classifier_label})",
        "input": [3, size, size], "batch": batch, "sigma": sigma, "device": device,
        "dtype": dtype,
        "per_sample_ms": round(1000 * whole / batch, 4),
        "denoiser_ms": round(1000 * denoise / batch, 4),
        "unet_ms": round(1000 * unet / batch, 4),
        "classifier_ms": round(1000 * classify / batch, 4),
        "outside_share": round((whole - unet - classify) / whole, 4),
        "micro_batch": micro_batch,
        "micro_batch_ms": round(1000 * micro / batch, 4),
        "micro_batch_ratio": round(micro / whole, 4),
        "micro_batch_plumbing_ratio": round(micro / chunks, 4),
    }


class TenPixels(torch.nn.Module):
    """A classifier that costs nothing: its ten logits are the first ten noisy pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def certify_memory(model_name: str, n: int, batch: int = 1000) -> dict:
    """Peak memory of one certify call at n; run in a fresh process (`engine_memory`)."""
    from tests.tensor_memory import PeakTensorMemory

    torch.set_num_threads(1)
    if model_name == "digits CNN":
        model = build_classifier("digits", class_names=[str(i) for i in range(10)], sigma=0.25)
    else:
        model = TenPixels()
    smooth = Smooth(model.eval(), 10, 0.25)
    x = torch.rand((1, 8, 8), generator=torch.Generator().manual_seed(0))
    smooth.certify(x, N0, 1000, 0.001, batch, torch.Generator().manual_seed(1))  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    with PeakTensorMemory() as memory:
        smooth.certify(x, N0, n, 0.001, batch, torch.Generator().manual_seed(2))
    seconds = time.perf_counter() - started
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    return {
        "model": model_name, "n": n, "batch": batch, "seconds": round(seconds, 1),
        "peak_tensor_bytes": memory.peak, "largest_tensor_bytes": memory.largest,
        "peak_rss_growth_bytes": 1024 * rss_growth,
    }


def engine_memory(largest_n: int) -> list[dict]:
    """`certify_memory` for the digits CNN at n = 10^4, 10^6 and the free classifier at
    n = 10^4 and `largest_n`, each in a fresh process so that one's peak hides no other's."""
    runs = [("digits CNN", 10**4), ("digits CNN", 10**6), ("free", 10**4), ("free", largest_n)]
    context = multiprocessing.get_context("spawn")
    rows = []
    for model_name, n in runs:
        with context.Pool(1) as pool:
            rows.append(pool.apply(certify_memory, (model_name, n)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench.json")
    parser.add_argument("--repeats", type=int, default=5)
    group = parser.add_argument_group("denoised smoothing (defaults: tiny models on the CPU)")
    group.add_argument("--device", default="cpu")
    group.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    group.add_argument("--if2", help="IF-II hub id or folder, e.g. DeepFloyd/IF-II-L-v1.0")
    group.add_argument("--classifier", help="a classifier name, e.g. clip-b32")
    group.add_argument("--size", type=int, default=32, help="image side (224 for real models)")
    group.add_argument("--batch", type=int, default=32)
    group.add_argument("--only-denoised", action="store_true",
                       help="skip the engine rows, time and memory (e.g. on a GPU box)")
    parser.add_argument("--memory-n", type=float, default=1e8,
                        help="the largest n of the engine-memory rows (1e8: ~1.5 min)")
    args = parser.parse_args()
    torch.manual_seed(0)  # only the random init of the ResNet; the engine uses its generators

    rows, memory = [], []
    if not args.only_denoised:
        digits = build_classifier("digits", class_names=[str(i) for i in range(10)], sigma=0.25)
        resnet = torchvision.models.resnet18(num_classes=10)
        rows = [
            engine_overhead("digits CNN", digits, (1, 8, 8), 10, 1000, 0.25, args.repeats,
                            calls=10),
            engine_overhead("ResNet-18", resnet, (3, 32, 32), 10, 400, 0.25,
                            max(1, args.repeats // 2)),
        ]
        memory = engine_memory(int(args.memory_n))
    denoised = denoised_smoothing_split(
        args.batch, 0.5, args.repeats, device=args.device, dtype=args.dtype, if2=args.if2,
        classifier_name=args.classifier, size=args.size,
    )
    record = {
        "what": "certify time / forward-only time, same process, same batches (median)",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(), "rows": rows,
        "denoised_smoothing": denoised, "engine_memory": memory,
        "noise_sampler": None if args.only_denoised else noise_cost(args.repeats),
    }
    from bench.attacks import attack_overhead  # imported here: it imports this module

    record["attacks"] = [] if args.only_denoised else attack_overhead(args.repeats)
    from bench.early_exit import early_exit_savings, print_early_exit
    from bench.packing import packing_speedups, print_packing
    from bench.sequential import print_sequential, sequential_savings

    if not args.only_denoised:
        record["sequential"] = sequential_savings()
        record["early_exit"] = early_exit_savings()
        record["packing"] = packing_speedups()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if rows:
        print(f"{'model':<12} {'input':<10} {'batch':>5} {'certify s':>10} "
              f"{'forward s':>10} {'ratio':>6}")
    for r in rows:
        shape = "x".join(map(str, r["input"]))
        print(f"{r['model']:<12} {shape:<10} {r['batch']:>5} {r['certify_s']:>10.3f} "
              f"{r['forward_only_s']:>10.3f} {r['ratio']:>6.3f}")
    print()
    print(f"{denoised['model']}, batch {denoised['batch']}, per sample:")
    print(f"  whole {denoised['per_sample_ms']:.3f} ms; denoiser {denoised['denoiser_ms']:.3f} ms"
          f" (its UNet call {denoised['unet_ms']:.3f} ms);"
          f" classifier {denoised['classifier_ms']:.3f} ms")
    print(f"  outside the two networks: {100 * denoised['outside_share']:.1f}% (target < 5%)")
    print(f"  in micro-batches of {denoised['micro_batch']}: {denoised['micro_batch_ms']:.3f} ms,"
          f" {denoised['micro_batch_ratio']:.3f}x one big batch (target <= 1.02),"
          f" {denoised['micro_batch_plumbing_ratio']:.3f}x the same chunks called directly")
    if memory:
        print()
        print(f"{'certify':<12} {'n':>11} {'batch':>5} {'peak tensors':>13} "
              f"{'peak RSS growth':>16} {'seconds':>8}")
    for m in memory:
        print(f"{m['model']:<12} {m['n']:>11,} {m['batch']:>5} "
              f"{m['peak_tensor_bytes'] / 2**20:>10.2f} MiB "
              f"{m['peak_rss_growth_bytes'] / 2**20:>12.1f} MiB {m['seconds']:>8.1f}")
    if "sequential" in record:
        print()
        print_sequential(record["sequential"])
        print_early_exit(record["early_exit"])
        print()
        print_packing(record["packing"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
