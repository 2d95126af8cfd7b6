"""Per-step time and peak memory of `adapt personalize` and `adapt finetune` on tiny models.

    python -m bench.adapt_steps [--steps 12] [--batch-size 4] [--resolution 32] [--threads 1]

Builds the tiny IF-II pipeline and tiny CLIP of the tests (tests/tiny_models.py,
tests/tiny_classifiers.py: random weights, the real classes), a reference set of
2 classes x 2 shots, then runs each training in a fresh subprocess on the CPU and prints
a markdown table:

- step time: the median of the `seconds` column of `loss_log.tsv` (one optimizer step:
  batch loading, forward, backward, update), first step excluded (warm-up);
- peak memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the subprocess (peak
  resident set, KiB on Linux), read once after the models are loaded ("before") and once
  after training ("peak"); tracemalloc is not used because it does not see torch's
  tensor allocations. The difference is what training added on top of the loaded models.

These are tiny-model figures: they show the pipeline's overheads and that the options
work, not what IF-II-L or CLIP ViT-B/32 need (see docs/adapt.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

CLASSES = ["dog", "cat"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _step_seconds(out: Path) -> list[float]:
    lines = (out / "loss_log.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    column = header.index("seconds")
    return [float(line.split("\t")[column]) for line in lines[1:]]


def _child(kind: str, setup: dict[str, Any]) -> dict[str, Any]:
    """Runs in the subprocess: one training run, its step times and peak RSS."""
    torch.set_num_threads(setup["threads"])
    from tests.tiny_classifiers import clip_options, register_tiny_clip

    register_tiny_clip(Path(setup["clip"]).parent)
    options = clip_options(setup["clip"], Path(setup["work"]) / f"cache_{kind}")
    out = Path(setup["work"]) / f"out_{kind}_{setup['variant']}"
    common = dict(references=setup["references"], out=str(out), classifier="clip-b32",
                  classifier_options=options, batch_size=setup["batch_size"],
                  checkpoint_every=0, device="cpu")
    if kind == "personalize":
        from adapt.personalize import PersonalizeConfig, personalize

        config = PersonalizeConfig(
            checkpoint=setup["if2"], steps=setup["steps"], lr=1e-4,
            resolution=setup["resolution"], mixed_precision=setup["mixed_precision"],
            gradient_checkpointing=setup["gradient_checkpointing"], **common,
        )
        run = personalize
    else:
        from adapt.finetune import FinetuneConfig, finetune

        # references / batch = steps per epoch: epochs chosen to give `steps` steps
        per_epoch = -(-setup["num_references"] // min(setup["batch_size"],
                                                      setup["num_references"]))
        config = FinetuneConfig(
            denoiser_checkpoint=setup["if2"], epochs=-(-setup["steps"] // per_epoch),
            resolution=setup["resolution"], mixed_precision=setup["mixed_precision"], **common,
        )
        run = finetune
    # ru_maxrss after loading the models, without training: build them once here.
    before = _loaded_rss(kind, config)
    run(config, progress=False)
    seconds = _step_seconds(out)
    return {
        "kind": kind,
        "steps": len(seconds),
        "median_step_s": statistics.median(seconds[1:] if len(seconds) > 1 else seconds),
        "rss_after_load_mib": before,
        "peak_rss_mib": _rss_mib(),
    }


def _loaded_rss(kind: str, config: Any) -> float:
    """Peak RSS once the run's models are in memory (loaded, then dropped)."""
    import gc

    from adapt.references import load_reference_set
    from denoisers.if2 import load_if2

    classes = list(load_reference_set(config.references).classes)
    checkpoint = config.checkpoint if kind == "personalize" else config.denoiser_checkpoint
    parts = load_if2(checkpoint, prompt="a photo of a {}.", token="sks")
    import classifiers

    classifier = classifiers.build_classifier(
        config.classifier, class_names=classes, **config.classifier_options
    )
    rss = _rss_mib()
    del parts, classifier
    gc.collect()
    return rss


def _setup(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tests.tiny_classifiers import save_tiny_clip, write_reference_set
    from tests.tiny_models import save_tiny_if2

    references = write_reference_set(work / "refs", CLASSES, shots=2, size=args.resolution)
    return {
        "work": str(work),
        "if2": str(save_tiny_if2(work / "if2")),
        "clip": str(save_tiny_clip(work / "clip")),
        "references": str(references),
        "num_references": 2 * len(CLASSES),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "threads": args.threads,
    }


VARIANTS = {
    "fp32": {"mixed_precision": "no", "gradient_checkpointing": False},
    "bf16": {"mixed_precision": "bf16", "gradient_checkpointing": True},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, setup_file = args.child.split(":", 1)
        print(json.dumps(_child(kind, json.loads(Path(setup_file).read_text()))))
        return

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup = _setup(work, args)
        results = []
        for variant, settings in VARIANTS.items():
            for kind in ("personalize", "finetune"):
                if kind == "finetune" and settings["gradient_checkpointing"]:
                    settings = {**settings, "gradient_checkpointing": False}  # n/a: no UNet grads
                setup_file = work / f"setup_{kind}.json"
                setup_file.write_text(json.dumps({**setup, **settings, "variant": variant}))
                done = subprocess.run(
                    [sys.executable, "-m", "bench.adapt_steps", "--child",
                     f"{kind}:{setup_file}"],
                    cwd=root, check=True, capture_output=True, text=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                label = "fp32"
                if settings["mixed_precision"] != "no":
                    label = "bf16 (frozen weights, autocast)"
                if settings["gradient_checkpointing"]:
                    label += " + gradient checkpointing"
                results.append({**result, "variant": label})

    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); tiny IF-II + tiny CLIP, {setup['num_references']} "
          f"references at {args.resolution}x{args.resolution}, batch {args.batch_size}, "
          f"{args.steps} steps")
    print("| run | precision | median step (s) | RSS after loading (MiB) | peak RSS (MiB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['kind']} | {r['variant']} | {r['median_step_s']:.3f} | "
              f"{r['rss_after_load_mib']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
