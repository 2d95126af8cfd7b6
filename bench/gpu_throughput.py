"""Images per hour of `certify --n 10000` with IF-II-L + CLIP-B/32 at 224 in bf16, on one GPU.

Issue 11's GPU target, in one command that fits a short device lease:

    python -m bench.gpu_throughput --out DIR [--budget-s 420] [--device cuda] [--peak-tflops X]

Stages, in priority order; `DIR/gpu_throughput.json` is rewritten before and after each
(and after each certified image), so a run stopped by a timeout still leaves its numbers:

a. environment and CUDA checks of our own paths: versions, device, the dense bf16 peak
   of the device (a table, or --peak-tflops) and a measured bf16 matrix product; the
   engine's noise sampler on the device (same draw for a seed, float32, mean and std);
   `run()` of the digits CNN packed against unpacked (rows, and argmax flips of the same
   noisy inputs at batch 100 against batch 1000).
b. IF-II-L + CLIP ViT-B/32 with random weights from their public configs
   (`bench.gpu_memory.if2_l_clip_b32`), precision applied as `certify --dtype` does (UNet
   weights in the dtype, CLIP in fp32 under the engine's autocast): FLOPs per noisy sample
   (`torch.utils.flop_counter`), then the forward of `DenoiseAndClassify` at several
   micro-batches: samples/s, TFLOP/s, fraction of peak, peak memory per image.
c. `certify` at n0 = 100, n = 10,000 through `smoothing.runner.run` (the engine and
   defaults the command uses: float64 noise, --batch 1000, the automatic micro-batch),
   then the same with `--sequential --radii 0,0.25,0.5,0.75,1.0`. Random weights make p_A
   meaningless, so the sequential images per hour are ALSO projected from the draw
   fraction measured on the Cohen-fitted p_A population; the JSON says which is which.
d. packing on the device: `bench.packing.compare` (PREDICT n = 100, the runner's packed
   passes against Cohen et al.'s per-example loop) for the digits CNN and a ResNet-18.

`--tiny` runs the same stages with the test suite's tiny IF-II and tiny CLIP at 32x32 on
the CPU, at n0 = 10, n = 100 (tests/test_gpu_throughput.py). Runs from the repository
root without installing the package (docs/benchmarks.md gives the device command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by the
# name torch reports. SXM parts only: a PCIe or NVL card has other clocks, so it needs
# --peak-tflops.
PEAK_BF16_DENSE_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}

# Samples evaluated by `certify --sequential --radii 0,0.25,0.5,0.75,1.0` (selection included)
# over CERTIFY's n0 + n at n = 10,000, sigma 0.5, on 500 values of p_A fitted to Cohen et
# al.'s ImageNet ResNet-50 sigma 0.5 results: `python -m bench.sequential` on the CPU
# (docs/scale.md, "Measured savings"). Random weights give the GPU run no such population.
COHEN_POPULATION_DRAW_FRACTION = 0.128

# Stage name -> its share of the budget. Deadlines are cumulative: time a stage leaves
# unused goes to the next ones.
STAGE_SHARES = {"environment": 0.08, "throughput": 0.22, "certify": 0.55, "packing": 0.15}
TABLE_IMAGES = 500
SIGMA = 0.5


@dataclass
class Profile:
    """The sizes of one mode: the real models on a GPU, or the tiny ones on the CPU."""

    tiny: bool
    size: int
    n0: int
    n: int
    batch: int
    micro_batches: tuple[int, ...]
    seconds_per_micro_batch: float
    full_images: int
    sequential_images: int
    digits_examples: int | None  # None: the whole test split


FULL = Profile(False, 224, 100, 10_000, 1000, (32, 64, 128, 256), 3.0, 2, 3, None)
TINY = Profile(True, 32, 10, 100, 50, (4, 16), 0.2, 2, 1, 30)


class Budget:
    """Cumulative stage deadlines from one start time; `clock` is replaceable in tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.start = clock()

    def deadline(self, stage: str) -> float:
        names = list(STAGE_SHARES)
        share = sum(STAGE_SHARES[name] for name in names[: names.index(stage) + 1])
        return self.start + share * self.seconds

    def left(self, stage: str) -> float:
        return self.deadline(stage) - self.clock()


class Record:
    """The JSON written after every step: what a timeout leaves behind."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {**header, "stages": {}}
        self.write()

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        temporary.replace(self.path)


def say(message: str) -> None:
    print(message, flush=True)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_for_name(name: str) -> float | None:
    """The table's dense bf16 peak for a device name as torch reports it, else None."""
    if "PCIe" in name or "NVL" in name:
        return None
    for key, value in PEAK_BF16_DENSE_TFLOPS.items():
        if key in name.split() or f"{key}-" in name:
            return value
    return None


def peak_tflops(device: str, given: float | None) -> float | None:
    """--peak-tflops, else the table's peak for a known CUDA device, else None."""
    if given is not None:
        return float(given)
    if torch.device(device).type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def fraction(achieved: float | None, peak: float | None) -> float | None:
    return None if achieved is None or not peak else achieved / peak


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "diffusers", "transformers", "open_clip_torch",
                 "timm", "huggingface_hub", "numpy", "scipy", "statsmodels"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# -- a. environment and CUDA checks ---------------------------------------------------------


def matmul_tflops(device: str, side: int, seconds: float) -> float:
    """A bf16 (fp32 on the CPU) matrix product's rate: the practical ceiling of the device."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((side, side), generator=generator, device=device, dtype=dtype)
    b = torch.randn((side, side), generator=generator, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        a @ b
        calls += 1
        if calls % 5 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * side**3 * calls / (time.perf_counter() - started) / 1e12


def noise_checks(device: str, elements: int) -> dict[str, Any]:
    """`gaussian_noise` on the device: one draw per seed, float32 output, N(0, sigma^2)."""
    from smoothing.noise import gaussian_noise

    sigma = 0.5

    def draw() -> torch.Tensor:
        return gaussian_noise((elements,), sigma, torch.Generator(device=device).manual_seed(7),
                              device=device)

    first, second = draw(), draw()
    z = first.double() / sigma
    mean, std = float(z.mean()), float(z.std())
    # 5 standard errors: a sound sampler fails this about once in 3 million runs
    mean_bound, std_bound = 5 / elements**0.5, 5 * (0.5 / elements) ** 0.5
    return {
        "elements": elements, "dtype": str(first.dtype), "float32": first.dtype == torch.float32,
        "same_draw_for_a_seed": bool(torch.equal(first, second)),
        "mean_z": mean, "std_z": std, "max_abs_z": float(z.abs().max()),
        "mean_ok": abs(mean) < mean_bound, "std_ok": abs(std - 1) < std_bound,
        "bounds": {"mean": mean_bound, "std": std_bound},
    }


def packing_identity(device: str, examples: int | None) -> dict[str, Any]:
    """The digits CNN's predict rows packed against unpacked through `run()` on the device,
    and the argmax flips of the very same noisy inputs at batch 100 against batch 1000."""
    from classifiers import build_classifier, build_dataset
    from smoothing.core import Smooth
    from smoothing.noise import gaussian_noise
    from smoothing.runner import ResultFile, RunSettings, example_generator, run

    digits = build_dataset("digits", split="test")
    model = build_classifier("digits-sigma0.25", class_names=digits.classes, sigma=0.25)
    model = model.to(device).eval()
    count = len(digits) if examples is None else min(examples, len(digits))
    dataset = [digits[i] for i in range(count)]
    smooth = Smooth(model, len(digits.classes), 0.25)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for pack in (False, True):
            values = {"mode": "predict", "n": 100, "alpha": 0.001, "batch_size": 1000}
            results = ResultFile(Path(folder) / f"pack{pack}", "predict", values)
            settings = RunSettings(**values, device=device, pack=pack)
            run(smooth, dataset, range(count), results, settings, progress=False)
            rows[pack] = {i: {k: v for k, v in r.items() if k != "time"}
                          for i, r in results.done.items()}
    differing = sorted(i for i in rows[False] if rows[False][i] != rows[True][i])
    # the noisy copies of ten examples, as one pass of 1000 and as ten passes of 100
    flips = votes = 0
    with torch.inference_mode():
        for start in range(0, count, 10):
            chunks = [
                gaussian_noise((100, *x.shape), 0.25, example_generator(0, i, device),
                               device=device).add_(x.to(device))
                for i, (x, _) in enumerate(dataset[start:start + 10], start=start)
            ]
            together = model(torch.cat(chunks)).argmax(1)
            alone = torch.cat([model(chunk).argmax(1) for chunk in chunks])
            flips += int((together != alone).sum())
            votes += together.numel()
    return {"examples": count, "rows_differing": differing, "argmax_flips": flips,
            "votes_compared": votes, "identical_rows": not differing}


def stage_environment(context: Context, record: dict[str, Any]) -> None:
    device = context.device
    side = 8192 if torch.device(device).type == "cuda" else 512
    record["matmul"] = {"side": side, "dtype": "bf16" if side == 8192 else "fp32",
                        "tflops": matmul_tflops(device, side, 0.5 if context.profile.tiny else 2)}
    say(f"[a] matrix product {side}^3: {record['matmul']['tflops']:.3f} TFLOP/s")
    elements = 2**20 if context.profile.tiny else 2**26
    record["noise"] = noise_checks(device, elements)
    noise = record["noise"]
    say(f"[a] noise on {device}: same draw {noise['same_draw_for_a_seed']}, "
        f"{noise['dtype']}, mean z {noise['mean_z']:+.2e}, std z {noise['std_z']:.5f}, "
        f"max |z| {noise['max_abs_z']:.2f}")
    record["packing_identity"] = packing_identity(device, context.profile.digits_examples)
    identity = record["packing_identity"]
    say(f"[a] digits predict packed vs unpacked: {len(identity['rows_differing'])} rows differ;"
        f" argmax flips {identity['argmax_flips']} of {identity['votes_compared']}")


# -- b. IF-II-L + CLIP-B/32: FLOPs and throughput ---------------------------------------------


@dataclass
class Context:
    device: str
    dtype: str
    profile: Profile
    peak: float | None
    budget: Budget
    record: Record
    smooth: Any = None  # built by stage b, used by c
    flops_per_sample: float | None = None
    classes: list[str] | None = None
    tiny_files: dict[str, Path] | None = None
    scratch: Path | None = None  # a temporary folder for models and result files


def count_flops(model: torch.nn.Module, size: int, device: str, autocast: Any = None) -> int:
    """FLOPs of one forward of `model` on one [3, size, size] input (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    noisy = torch.zeros((1, 3, size, size), device=device)
    with torch.inference_mode(), autocast or contextlib.nullcontext(), \
            FlopCounterMode(display=False) as counter:
        model(noisy)
    return int(counter.get_total_flops())


def save_tiny_models(folder: Path) -> dict[str, Path]:
    """The test suite's tiny IF-II and tiny CLIP, saved as a user's checkpoints are."""
    from tests.tiny_classifiers import save_tiny_clip
    from tests.tiny_models import save_tiny_if2

    return {"if2": save_tiny_if2(folder / "if2"), "clip": save_tiny_clip(folder / "clip"),
            "cache": folder / "cache"}


def tiny_clip(files: dict[str, Path], class_names: Sequence[str], device: str) -> torch.nn.Module:
    from classifiers import build_classifier
    from tests.tiny_classifiers import clip_options

    options = clip_options(files["clip"], files["cache"])
    return build_classifier("clip-b32", class_names=list(class_names), device=device, **options)


TINY_CLASSES = ["cat", "dog", "car"]


def build_pipeline(context: Context, folder: Path) -> torch.nn.Module:
    """DenoiseAndClassify with the precision of `certify --dtype`: the denoiser's weights
    in the dtype (as `cli.options.build_denoiser` loads them), the classifier as built."""
    from cli.options import build_denoiser
    from denoisers.pipeline import DenoiseAndClassify

    device = context.device
    if context.profile.tiny:
        context.tiny_files = save_tiny_models(folder)
        context.classes = TINY_CLASSES
        options = {"denoiser": "if2", "dtype": context.dtype, "dataset": "random",
                   "denoiser_checkpoint": str(context.tiny_files["if2"]), "variant": None,
                   "lora": None, "prompt": None, "token": None, "allow_untrained_sigma": False}
        denoiser = build_denoiser(options, SIGMA, 1.8, device)
        classifier = tiny_clip(context.tiny_files, TINY_CLASSES, device).to(device).eval()
        return DenoiseAndClassify(denoiser, classifier, SIGMA).to(device).eval()
    from bench.gpu_memory import if2_l_clip_b32
    from denoisers.registry import parse_dtype

    torch.manual_seed(0)  # the random weights only; the engine draws from its generators
    model, _ = if2_l_clip_b32(parse_dtype(context.dtype), device)
    context.classes = list(model.classifier.class_names)
    return model.to(device).eval()


def ensure_model(context: Context, record: dict[str, Any]) -> None:
    """Build the smoothed pipeline and count its FLOPs per sample, once (stage b, or stage c
    when run without b)."""
    from cli.options import DTYPES
    from smoothing.core import Smooth

    if context.smooth is not None:
        return
    device, profile = context.device, context.profile
    started = time.perf_counter()
    model = build_pipeline(context, context.scratch / "models")
    smooth = Smooth(model, len(context.classes), SIGMA, DTYPES[context.dtype])
    record["model"] = ("tiny IF-II + tiny CLIP (test suite)" if profile.tiny else
                       "IF-II-L + CLIP ViT-B/32, random weights from the public configs")
    record["build_s"] = time.perf_counter() - started
    record["parameters"] = sum(p.numel() for p in model.parameters())
    autocast = smooth._autocast(torch.device(device))
    context.flops_per_sample = count_flops(model, profile.size, device, autocast)
    record["flops_per_sample"] = context.flops_per_sample
    context.smooth = smooth
    say(f"[b] {record['model']}: {record['parameters'] / 1e6:.1f} M parameters, "
        f"{context.flops_per_sample / 1e12:.4g} TFLOP per noisy sample at {profile.size}")


def stage_throughput(context: Context, record: dict[str, Any]) -> None:
    from denoisers.pipeline import DenoiseAndClassify

    device, profile = context.device, context.profile
    ensure_model(context, record)
    smooth = context.smooth
    model = smooth.base_classifier
    generator = torch.Generator(device=device).manual_seed(0)
    rows = record.setdefault("micro_batches", [])
    for size in profile.micro_batches:
        if context.budget.left("throughput") < 2 * profile.seconds_per_micro_batch:
            rows.append({"micro_batch": size, "skipped": "out of the stage's time"})
            continue
        split = DenoiseAndClassify(model.denoiser, model.classifier, SIGMA, micro_batch=size)
        noisy = torch.rand((size, 3, profile.size, profile.size), generator=generator,
                           device=device)
        row = time_forward(split, noisy, smooth, profile.seconds_per_micro_batch)
        rows.append(row)
        if split.micro_batch != size:  # the pipeline halved it after running out of memory
            row["out_of_memory"] = f"halved to {split.micro_batch}: the row is not of {size}"
            say(f"[b] micro-batch {size}: out of memory ({row['out_of_memory']}); stopping")
            break
        row["tflops"] = row["samples_per_s"] * context.flops_per_sample / 1e12
        row["fraction_of_peak"] = fraction(row["tflops"], context.peak)
        say(f"[b] micro-batch {size}: {row['samples_per_s']:.1f} samples/s, "
            f"{row['tflops']:.4g} TFLOP/s" + (f", {row['fraction_of_peak']:.3f} of peak"
                                               if row["fraction_of_peak"] is not None else ""))
        context.record.write()


def time_forward(model: torch.nn.Module, noisy: torch.Tensor, smooth: Any,
                 seconds: float) -> dict[str, Any]:
    """Samples per second of `model(noisy)` under the engine's autocast, and its peak
    memory on CUDA."""
    device = str(noisy.device)
    cuda = noisy.is_cuda
    autocast = smooth._autocast(noisy.device)
    with torch.inference_mode(), autocast:
        model(noisy)  # warm-up: kernels chosen, memory cached
        synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(noisy.device)
            base = torch.cuda.memory_allocated(noisy.device)
        calls, started = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - started < seconds:
            model(noisy)
            calls += 1
            synchronize(device)
        elapsed = time.perf_counter() - started
    row = {"micro_batch": noisy.shape[0], "calls": calls, "seconds": elapsed,
           "samples_per_s": calls * noisy.shape[0] / elapsed}
    if cuda:
        peak = torch.cuda.max_memory_allocated(noisy.device) - base
        row["peak_memory_per_image_bytes"] = peak / noisy.shape[0]
        # the estimate the automatic micro-batch is sized by (denoisers.pipeline)
        from denoisers.pipeline import IF2_L_CLIP_B32_BYTES_PER_IMAGE_224

        weights = next(model.parameters()).element_size()
        element = 2 if smooth.autocast_dtype is not None or weights == 2 else 4
        row["estimated_memory_per_image_bytes"] = (
            IF2_L_CLIP_B32_BYTES_PER_IMAGE_224[element] * noisy.shape[-1] * noisy.shape[-2]
            / 224**2)
    return row


# -- c. certify at full n, and sequential ---------------------------------------------------


class RandomImages:
    """Images in [0, 1] drawn from a generator seeded by their index, all labelled 0: random
    weights make any real image as meaningless as these."""

    def __init__(self, count: int, size: int, classes: Sequence[str]):
        self.count, self.size, self.classes = count, size, list(classes)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(index)
        return torch.rand((3, self.size, self.size), generator=generator), 0


def run_settings(profile: Profile, device: str, sequential_radii: Sequence[float] | None):
    """The RunSettings `certify` builds from these options and its defaults."""
    from cli.main import run_settings as command_run_settings

    options = {"n": profile.n, "n0": profile.n0, "alpha": 0.001, "batch": profile.batch,
               "seed": 0, "sequential": sequential_radii is not None,
               "radii": None if sequential_radii is None else tuple(sequential_radii),
               "pack": None}
    return command_run_settings("certify", options, device)


def certify_one(context: Context, results: Any, settings: Any, dataset: RandomImages,
                count: int) -> dict[str, Any]:
    """Certify image `count - 1` by resuming `results` over the first `count` indices."""
    from smoothing.runner import run

    index = count - 1
    cuda = torch.device(context.device).type == "cuda"
    synchronize(context.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(context.device)
    started = time.perf_counter()
    run(context.smooth, dataset, range(count), results, settings, progress=False)
    synchronize(context.device)
    seconds = time.perf_counter() - started
    row = {k: v for k, v in results.done[index].items()}
    draws = results.forward_passes.get(index)
    achieved = None
    if draws is not None and context.flops_per_sample:
        achieved = draws * context.flops_per_sample / seconds / 1e12
    return {"row": row, "draws": draws, "seconds": seconds, "tflops": achieved,
            "fraction_of_peak": fraction(achieved, context.peak),
            # set only when an out-of-memory error halved the automatic micro-batch
            "micro_batch_after_halving": context.smooth.base_classifier.micro_batch,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(context.device) if cuda
            else None}


def summarize(images: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = sum(image["seconds"] for image in images) / len(images)
    per_hour = 3600 / seconds
    return {"images": len(images), "seconds_per_image": seconds, "images_per_hour": per_hour,
            f"gpu_hours_for_{TABLE_IMAGES}_images": TABLE_IMAGES / per_hour}


def stage_certify(context: Context, record: dict[str, Any]) -> None:
    from bench.sequential import GRID
    from denoisers.pipeline import default_micro_batch
    from smoothing.runner import ResultFile

    ensure_model(context, record)
    profile, device, budget = context.profile, context.device, context.budget
    count = max(profile.full_images, profile.sequential_images)
    dataset = RandomImages(count, profile.size, context.classes)
    record["settings"] = {"n0": profile.n0, "n": profile.n, "alpha": 0.001,
                          "batch": profile.batch, "seed": 0, "sigma": SIGMA,
                          "dtype": context.dtype, "sequential_radii": list(GRID)}
    if torch.device(device).type == "cuda":
        noisy = torch.empty((profile.batch, 3, profile.size, profile.size), device=device)
        with context.smooth._autocast(noisy.device):
            record["automatic_micro_batch"] = default_micro_batch(
                context.smooth.base_classifier.denoiser, noisy)
        del noisy
    folder = context.scratch / "results"
    full = ResultFile(folder / "certify", "certify", dict(record["settings"], radii=None))
    sequential = ResultFile(folder / "sequential", "certify", dict(record["settings"]))
    full_settings = run_settings(profile, device, None)
    sequential_settings = run_settings(profile, device, GRID)
    measured = record.setdefault("measured", {"full_n": [], "sequential": []})
    # stage b's forward rate at its largest micro-batch: a first image's time, so that one
    # far too slow for the lease is not started (and the rate gives images per hour too)
    forward = [r for r in context.record.stage("throughput").get("micro_batches", [])
               if "samples_per_s" in r]
    estimate = None
    if forward:
        rate = forward[-1]["samples_per_s"]
        estimate = (profile.n0 + profile.n) / rate
        record["from_forward_rate"] = {
            "note": "(n0 + n) / stage b's samples/s at micro-batch "
                    f"{forward[-1]['micro_batch']}: the networks alone, not a certify run",
            "seconds_per_image": estimate, "images_per_hour": 3600 / estimate,
        }

    def fits(seconds: float | None) -> bool:
        return seconds is None or budget.left("certify") > seconds

    plan = [("full_n", 1)] + [("sequential", k + 1) for k in range(profile.sequential_images)]
    plan += [("full_n", k + 1) for k in range(1, profile.full_images)]
    for kind, number in plan:
        if kind == "full_n":
            if not fits(estimate):
                record.setdefault("skipped", []).append(f"full-n image {number}: out of time")
                continue
            image = certify_one(context, full, full_settings, dataset, number)
            estimate = image["seconds"]
        else:
            # random weights: no guess of their draws, so half a full image is reserved
            guess = None if estimate is None else 0.5 * estimate
            if measured["sequential"]:
                guess = max(i["seconds"] for i in measured["sequential"])
            if not fits(guess):
                record.setdefault("skipped", []).append(f"sequential image {number}: out of time")
                continue
            image = certify_one(context, sequential, sequential_settings, dataset, number)
        measured[kind].append(image)
        say(f"[c] {kind} image {number - 1}: {image['seconds']:.1f} s, {image['draws']} draws, "
            f"row {image['row']}")
        _certify_summary(context, record)
        context.record.write()


def _certify_summary(context: Context, record: dict[str, Any]) -> None:
    measured = record["measured"]
    summary: dict[str, Any] = {}
    if measured["full_n"]:
        summary["full_n_measured"] = summarize(measured["full_n"])
        full = summary["full_n_measured"]
        draws = [i["draws"] for i in measured["full_n"] if i["draws"] is not None]
        if draws and context.flops_per_sample:
            achieved = sum(draws) * context.flops_per_sample / 1e12 / (
                full["seconds_per_image"] * len(measured["full_n"]))
            full["tflops"], full["fraction_of_peak"] = achieved, fraction(achieved, context.peak)
        per_hour = full["images_per_hour"] / COHEN_POPULATION_DRAW_FRACTION
        summary["sequential_projected"] = {
            "basis": (f"full-n images per hour measured here / {COHEN_POPULATION_DRAW_FRACTION}"
                      " (draw fraction of --sequential on the Cohen-fitted p_A population, "
                      "bench.sequential on the CPU): a projection, not a measurement"),
            "draw_fraction": COHEN_POPULATION_DRAW_FRACTION,
            "images_per_hour": per_hour,
            f"gpu_hours_for_{TABLE_IMAGES}_images": TABLE_IMAGES / per_hour,
        }
    if measured["sequential"]:
        summary["sequential_measured_random_weights"] = {
            **summarize(measured["sequential"]),
            "draws": [i["draws"] for i in measured["sequential"]],
            "note": "measured, but on random weights: their p_A, hence their draws, mean "
                    "nothing for a trained model",
        }
    record["summary"] = summary


# -- d. packing on the device --------------------------------------------------------------


def stage_packing(context: Context, record: dict[str, Any]) -> None:
    import torchvision

    from bench.packing import compare, packing_speedups
    from classifiers import build_classifier, build_dataset

    device = context.device
    if not context.profile.tiny:
        record["rows"] = packing_speedups(device=device)
    else:  # the same two models on a few examples
        digits = build_dataset("digits", split="test")
        cnn = build_classifier("digits-sigma0.25", class_names=digits.classes, sigma=0.25)
        images = [digits[i][0] for i in range(context.profile.digits_examples)]
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18(num_classes=10)
        random = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i))
                  for i in range(4)]
        record["rows"] = [compare("digits CNN", cnn, images, 10, device=device),
                          compare("ResNet-18 3x32x32", resnet, random, 10, device=device)]
    for row in record["rows"]:
        say(f"[d] predict n=100 {row['model']}: Cohen loop {row['reference_s']:.2f} s, packed "
            f"{row['packed_s']:.2f} s, speedup {row['speedup']:.2f}")


STAGES: dict[str, Callable[[Context, dict[str, Any]], None]] = {
    "environment": stage_environment,
    "throughput": stage_throughput,
    "certify": stage_certify,
    "packing": stage_packing,
}


def print_table(data: dict[str, Any]) -> None:
    stages = data["stages"]
    say("")
    say(f"device {data['device_name']}, {data['dtype']}, peak {data['peak_tflops']} TFLOP/s "
        f"({data['peak_source']})")
    for name in STAGES:
        say(f"  stage {name}: {stages.get(name, {}).get('status', 'not run')}")
    throughput = stages.get("throughput", {})
    for row in throughput.get("micro_batches", []):
        if "samples_per_s" in row:
            share = row.get("fraction_of_peak")
            say(f"  micro-batch {row['micro_batch']:>4}: {row['samples_per_s']:9.1f} samples/s "
                f"{row['tflops']:8.2f} TFLOP/s" + (f"  {share:.3f} of peak" if share else ""))
    certify = stages.get("certify", {})
    if "from_forward_rate" in certify:
        rate = certify["from_forward_rate"]
        say(f"  {'certify full n (from the forward rate)':<42} {rate['images_per_hour']:9.1f} "
            "images/h")
    summary = certify.get("summary", {})
    labels = {"full_n_measured": "certify full n (measured)",
              "sequential_measured_random_weights": "sequential (measured, random weights)",
              "sequential_projected": "sequential (PROJECTED from draw fraction)"}
    for key, label in labels.items():
        if key in summary:
            row = summary[key]
            hours = row[f"gpu_hours_for_{TABLE_IMAGES}_images"]
            say(f"  {label:<42} {row['images_per_hour']:9.1f} images/h, "
                f"{TABLE_IMAGES} images: {hours:.2f} GPU-hours")
    for row in stages.get("packing", {}).get("rows", []):
        say(f"  packing {row['model']:<20} speedup {row['speedup']:.2f}x over Cohen's loop")


def main(argv: Sequence[str] | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_throughput.json")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for all stages; each gets a share, unused time rolls on")
    parser.add_argument("--tiny", action="store_true",
                        help="the test suite's tiny IF-II + CLIP at 32x32, small n, on the CPU")
    parser.add_argument("--device", default=None, help="[default: cuda, or cpu with --tiny]")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="as certify --dtype [default: bf16; fp32 with --tiny, since a "
                             "CPU's bf16 autocast is slow]")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for the fractions [default: a table of GPUs]")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available (use --tiny on a CPU)")
    wanted = args.stages.split(",")
    unknown = [name for name in wanted if name not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; known: {list(STAGES)}")
    peak = peak_tflops(device, args.peak_tflops)
    cuda = torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor()
    header = {
        "what": "issue 11: certify images per hour, IF-II-L + CLIP-B/32, fraction of peak",
        "mode": "tiny (CPU test models)" if args.tiny else "full",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "budget_s": args.budget_s, "device": device, "dtype": args.dtype,
        "device_name": name or platform.machine(),
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops is not None else (
            "datasheet dense bf16 table" if peak is not None else "unknown: no fractions"),
        "gpu_memory_bytes": torch.cuda.mem_get_info(device)[1] if cuda else None,
        "versions": versions(), "threads": torch.get_num_threads(),
    }
    record = Record(Path(args.out) / "gpu_throughput.json", header)
    budget = Budget(args.budget_s, clock)
    context = Context(device, args.dtype, TINY if args.tiny else FULL, peak, budget, record)
    say(f"{header['device_name']} ({device}), peak {peak} TFLOP/s, budget {args.budget_s:.0f} s")
    with tempfile.TemporaryDirectory(prefix="gpu_throughput_") as scratch:
        context.scratch = Path(scratch)
        run_stages(context, wanted)
    print_table(record.data)
    say(f"wrote {record.path}")
    return record.data


def run_stages(context: Context, wanted: Sequence[str]) -> None:
    """Each stage asked for, in order, while the budget lasts; the JSON before and after."""
    record, budget = context.record, context.budget
    for name, stage in STAGES.items():
        entry = record.stage(name)
        if name not in wanted:
            entry["status"] = "not asked for (--stages)"
        elif budget.left(name) <= 0:
            entry["status"] = "skipped: out of budget"
        else:
            entry["status"] = "running"  # what a run killed inside this stage leaves
            record.write()
            started = time.perf_counter()
            try:
                stage(context, entry)
                entry["status"] = "done"
            except Exception as error:  # the next stages still run and report
                entry["status"] = f"failed: {type(error).__name__}: {error}"
                entry["traceback"] = traceback.format_exc().splitlines()[-6:]
                say(f"[{name}] FAILED: {entry['status']}")
            entry["seconds"] = time.perf_counter() - started
        record.write()


if __name__ == "__main__":
    main()
