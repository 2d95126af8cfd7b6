"""CLIPure on the CPU: per-image cost against plain CLIP, and the digits-scale attack table.

    python -m bench.purifier_clipure [--batch 8] [--repeats 5] [--threads 1] [--digits]
                                     [--geometry]

1. Cost (`clipure_cost`): the tiny CLIP of the tests (tests/tiny_classifiers.py: ViT
   width 64, 2 layers, 32x32; random weights, the real open_clip class) and the tiny
   diffusers prior (tests/tiny_purifier_models_clipure.py). Median seconds per image of
   the zero-shot classifier's forward pass, of CLIPure-Cos and of CLIPure-Diff with the
   paper's 10 steps, evaluation mode (under no_grad: the purifier still takes its inner
   gradients) and one attack step (forward + input gradient, exact mode), interleaved
   (`bench.run.interleaved_medians`). The paper reports CLIPure-Cos at 1.14x and
   CLIPure-Diff at 27.78x plain CLIP ViT-L/14 on an RTX 4090 (Table 3).
2. Digits (`digits_attack_table`, with --digits): the feature-space CLIPure step of
   `denoisers.purifiers.clipure.build_feature_cos` on the embedded `digits-clean` CNN,
   the first 50 test images, PGD-L2 eps 0.5 (100 steps, step 4/3 eps/100, random start
   seeded 0) under blind (attack the CNN, evaluate the defense), bpda, official and
   exact gradients, for step sizes 30 (the paper's), 0.1 and 0.03.
3. Geometry (`step_geometry`, with --geometry): no model, only Eq. 8-9 in float64 on
   random 768-d unit embeddings (ViT-L/14's width) whose cosine with a random unit t is
   drawn uniformly in [0.15, 0.35] (the range of CLIP's image-text cosines): how far ten
   steps of 30 move them, with per-example ("sample") and the official code's whole-batch
   ("batch") normalization, at batch sizes 1 to 128.

Tiny-model figures: they show the overhead of the loop relative to the encoder, not the
cost on a real ViT-L/14 (where the encoder dominates even more).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch


def clipure_cost(batch: int = 8, repeats: int = 5) -> dict[str, float]:
    from bench.run import interleaved_medians
    from classifiers.registry import build_classifier
    from denoisers.purifiers import build_purifier
    from tests.test_clip import TINY_ARCH
    from tests.tiny_classifiers import clip_options, save_tiny_clip
    from tests.tiny_purifier_models_clipure import save_tiny_prior

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        checkpoint = save_tiny_clip(work / "clip")
        clip = build_classifier(
            "clip-b32", class_names=["dog", "cat", "car"],
            **clip_options(checkpoint, work / "cache"),
        )
        prior = save_tiny_prior(work / "prior")
        cos = build_purifier("clipure-cos", classifier=clip)
        diff = build_purifier(
            "clipure-diff", classifier=clip, checkpoint=str(prior), prior_clip_arch=TINY_ARCH
        )
        diff.generator = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

        def evaluate(model):
            def run():
                with torch.no_grad():
                    model(x)
            return run

        def attack_step(model):
            def run():
                xr = x.clone().requires_grad_(True)
                torch.autograd.grad(model(xr)[:, 0].sum(), xr)
            return run

        works = [evaluate(clip), evaluate(cos), evaluate(diff),
                 attack_step(clip), attack_step(cos), attack_step(diff)]
        seconds = interleaved_medians(works, repeats)
    names = ["clip", "cos", "diff", "clip_attack_step", "cos_attack_step", "diff_attack_step"]
    return {name: s / batch for name, s in zip(names, seconds, strict=True)}


def digits_attack_table(examples: int = 50, step_sizes=(30.0, 0.1, 0.03)) -> list[dict]:
    from classifiers.digits import CLASS_NAMES
    from classifiers.registry import build_classifier, build_dataset
    from denoisers.purifiers.clipure import build_feature_cos
    from smoothing.attacks import ThreatModel, pgd

    cnn = build_classifier("digits-clean", class_names=CLASS_NAMES).eval()
    data = build_dataset("digits", split="test")
    x = torch.stack([data[i][0] for i in range(examples)])
    y = torch.tensor([data[i][1] for i in range(examples)])
    threat = ThreatModel("l2", 0.5)

    def accuracy(model, images):
        with torch.no_grad():
            return (model(images).argmax(dim=1) == y).float().mean().item()

    def attacked(target):
        return pgd(target, x, y, threat, steps=100, generator=torch.Generator().manual_seed(0))

    rows = [{"defense": "none", "clean": accuracy(cnn, x), "robust": accuracy(cnn, attacked(cnn))}]
    for step_size in step_sizes:
        for mode in ("blind", "bpda", "official", "exact"):
            model = build_feature_cos(
                classifier=cnn, gradient="exact" if mode == "blind" else mode,
                step_size=step_size,
            )
            x_adv = attacked(cnn if mode == "blind" else model)
            rows.append({"defense": f"feature-cos step {step_size:g}", "gradient": mode,
                         "clean": accuracy(model, x), "robust": accuracy(model, x_adv)})
    return rows


def step_geometry(batch_sizes=(1, 2, 8, 32, 128), dim: int = 768, seed: int = 0) -> list[dict]:
    import torch.nn.functional as F
    from torch import nn

    from denoisers.purifiers.clipure import CLIPurePurifiedClassifier, CosineLikelihood

    generator = torch.Generator().manual_seed(seed)
    t = F.normalize(torch.randn(dim, generator=generator, dtype=torch.float64), dim=0)
    rows = []
    for batch in batch_sizes:
        cosines = 0.15 + 0.2 * torch.rand(batch, generator=generator, dtype=torch.float64)
        others = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
        others = F.normalize(others - (others @ t)[:, None] * t, dim=-1)
        u = cosines[:, None] * t + (1 - cosines.square()).sqrt()[:, None] * others
        for normalization in ("sample", "batch"):
            model = CLIPurePurifiedClassifier(
                nn.Identity(), CosineLikelihood(t), gradient="official", steps=10,
                step_size=30.0, normalization=normalization, settings={},
            )
            out = model.purify_embeddings(u)
            moved = torch.rad2deg(torch.acos((out * u).sum(-1).clamp(-1, 1)))
            rows.append({
                "batch": batch, "normalization": normalization,
                "moved_median": moved.median().item(), "moved_max": moved.max().item(),
                "cos_before": cosines.mean().item(), "cos_after": (out @ t).mean().item(),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--digits", action="store_true", help="also the digits attack table")
    parser.add_argument("--geometry", action="store_true", help="also the step geometry table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), batch {args.batch}")
    cost = clipure_cost(args.batch, args.repeats)
    print("| model | eval ms/image | x CLIP | attack step ms/image | x CLIP |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("clip", "cos", "diff"):
        evaluation, step = cost[name], cost[f"{name}_attack_step"]
        print(f"| {name} | {1e3 * evaluation:.2f} | {evaluation / cost['clip']:.2f} | "
              f"{1e3 * step:.2f} | {step / cost['clip_attack_step']:.2f} |")
    if args.digits:
        print("\n| defense | gradient | clean | robust (PGD-L2 0.5) |")
        print("| --- | --- | --- | --- |")
        for row in digits_attack_table():
            print(f"| {row['defense']} | {row.get('gradient', '-')} | {row['clean']:.2f} | "
                  f"{row['robust']:.2f} |")

    if args.geometry:
        print("\n| batch | normalization | moved (deg, median / max) | mean cos(u, t) before "
              "-> after |")
        print("| --- | --- | --- | --- |")
        for row in step_geometry():
            print(f"| {row['batch']} | {row['normalization']} | {row['moved_median']:.4f} / "
                  f"{row['moved_max']:.4f} | {row['cos_before']:.3f} -> {row['cos_after']:.3f} |")


if __name__ == "__main__":
    main()
