"""Per-image cost of CMAP against one forward pass of its classifier, on the CPU.

    python -m bench.purifier_cmap [--batch 8] [--repeats 3] [--threads 1]
    python -m bench.purifier_cmap --attack [--images 16] [--pgd-steps 10] [--eot 4] [--eps 0.1]

Models: the digits consistency model bundled with the package (denoisers/weights/digits_cm,
1 x 8 x 8, the UNet of the digits DDPM) with `digits-clean`, and the tests' tiny
consistency model (tests/tiny_purifier_models_cmap.py) with a linear classifier. CMAP runs
with its defaults (K = 8 latents, 100 Adam steps) in the evaluation setting (no graph to
the input: what `predict`/clean accuracy costs) and, for the tiny model, also as one
exact-gradient attack step (forward with the second-order graph + backward to x).
Timings are medians of `--repeats` (bench.run.interleaved_medians). The ratio is
(CMAP seconds per image) / (classifier forward seconds per image) at the same batch.

Not registered in bench/run.py (the integrator does that).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.run import interleaved_medians


def measure(purified: nn.Module, classifier: nn.Module, x: torch.Tensor, repeats: int,
            attack_step: bool = False) -> dict:
    def classify() -> None:
        with torch.no_grad():
            classifier(x)

    def purify_and_vote() -> None:
        purified.generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            purified(x)

    works = [classify, purify_and_vote]
    if attack_step:
        def exact_gradient() -> None:
            purified.generator = torch.Generator().manual_seed(0)
            inputs = x.clone().requires_grad_(True)
            torch.autograd.grad(purified(inputs)[:, 0].sum(), inputs)

        works.append(exact_gradient)
    seconds = interleaved_medians(works, repeats)
    batch = x.shape[0]
    row = {
        "batch": batch,
        "classifier_s_per_image": seconds[0] / batch,
        "cmap_s_per_image": seconds[1] / batch,
        "ratio": seconds[1] / seconds[0],
    }
    if attack_step:
        row["exact_gradient_s_per_image"] = seconds[2] / batch
        row["exact_gradient_ratio"] = seconds[2] / seconds[0]
    return row


def attack_digits(images: int, pgd_steps: int, eot: int, eps: float, seed: int = 0) -> dict:
    """Robust accuracy of CMAP (defaults, bundled digits CM, `digits-clean`) on the first
    `images` test digits under Linf PGD at `eps`: blind (PGD-100 on the classifier alone,
    evaluated on CMAP), BPDA+EOT and exact gradients (`pgd_steps` each, EOT over `eot`
    draws of CMAP's latents). Each attack has its own generator; the evaluation another."""
    from classifiers import build_classifier
    from classifiers.digits import CLASS_NAMES, load_digits_split
    from denoisers.purifiers.cmap import build
    from smoothing.attacks import EOT, ThreatModel, pgd

    classifier = build_classifier("digits-clean", class_names=CLASS_NAMES).eval()
    test = load_digits_split("test")
    x, y = test.images[:images], test.labels[:images]
    threat = ThreatModel("linf", eps)

    def accuracy(model: nn.Module, inputs: torch.Tensor) -> float:
        model.generator = torch.Generator().manual_seed(seed + 1000)  # evaluation draws
        with torch.no_grad():
            return float((model(inputs).argmax(1) == y).float().mean())

    evaluated = build(classifier=classifier, gradient="exact")
    rows = {"images": images, "eps_linf": eps, "pgd_steps": pgd_steps, "eot": eot,
            "classifier_clean": float((classifier(x).argmax(1) == y).float().mean()),
            "cmap_clean": accuracy(evaluated, x)}
    start = time.perf_counter()
    blind = pgd(classifier, x, y, threat, steps=100, generator=torch.Generator().manual_seed(seed))
    rows["classifier_under_blind"] = float((classifier(blind).argmax(1) == y).float().mean())
    rows["cmap_under_blind"] = accuracy(evaluated, blind)
    for gradient, samples in (("bpda", eot), ("exact", 1)):
        attacked = build(classifier=classifier, gradient=gradient)
        attacked.generator = torch.Generator().manual_seed(seed + 1)
        model = EOT(attacked, samples) if samples > 1 else attacked
        x_adv = pgd(model, x, y, threat, steps=pgd_steps,
                    generator=torch.Generator().manual_seed(seed))
        rows[f"cmap_under_{gradient}"] = accuracy(evaluated, x_adv)
        rows[f"{gradient}_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attack", action="store_true",
                        help="instead: robust accuracy at digits scale (attack_digits)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--eot", type=int, default=4)
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.attack:
        print(json.dumps(attack_digits(args.images, args.pgd_steps, args.eot, args.eps), indent=2))
        return

    from classifiers import build_classifier
    from classifiers.digits import CLASS_NAMES
    from denoisers.purifiers.cmap import BUNDLED_DIGITS_CM, build
    from tests.tiny_purifier_models_cmap import save_tiny_cm

    results = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    x = torch.rand((args.batch, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    if (BUNDLED_DIGITS_CM / "unet").is_dir():
        digits = build_classifier("digits-clean", class_names=CLASS_NAMES).eval()
        results["digits_cm_with_digits_clean"] = measure(
            build(classifier=digits), digits, x, args.repeats
        )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_tiny_cm(Path(tmp) / "cm")
        torch.manual_seed(0)
        linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
        results["tiny_cm_with_linear"] = measure(
            build(classifier=linear, checkpoint=checkpoint), linear, x, args.repeats,
            attack_step=True,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
