"""`make bench`, attacks: the cost of an attack step against the model's own passes.

For each model and threat model, in one process and interleaved (`interleaved_medians`):

- PGD: `pgd(model, x, y, steps=S)` (seed 004's defaults otherwise: random start, step
  4/3 eps / S) against S forward+backward passes of the model alone on x (cross-entropy,
  gradient in the input). Target: <= 1.05.
- SmoothAdv: `smoothadv(model, x, y, sigma, m=32, steps=S)` against S forward+backward
  passes of the model alone on the same m noisy copies of x, in one batch of B * m.
  Target: <= 1.10.

The ratio is what the attack adds per step: its noise draw and random start (once per
call), the normalized or sign step, the projection onto the threat model (for L2 the
bisection of `ThreatModel.project`), the finiteness checks, and for SmoothAdv the
log-mean-softmax objective. Models: the digits CNN at batch 1 (the attack command
attacks one example at a time, each with its own seed) and 16, and the test suite's tiny
`DenoiseAndClassify(IF-II, CLIP)` at 32x32, batch 1. Steps: 20 on the digits, 3 through
the denoiser (the ratio is per step; the per-call noise draw and random start are spread
over fewer steps than PGD-100's, which can only raise it).

`python -m bench.attacks` runs these rows alone (`--repeats`, `--out`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.run import interleaved_medians
from classifiers import build_classifier
from smoothing.attacks import ThreatModel, pgd, smoothadv

M_TEST = 32
SIGMA = 0.25
EPS = {"l2": 0.5, "linf": 8 / 255}
TARGETS = {"pgd": 1.05, "smoothadv": 1.10}


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward and backward pass of the model alone: the input gradient of its CE."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def step_costs(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, steps: int,
    repeats: int,
) -> list[dict]:
    """The PGD and SmoothAdv rows of one model, batch and norm."""
    threat = ThreatModel(norm, EPS[norm])
    noise = SIGMA * torch.randn((x.shape[0], M_TEST, *x.shape[1:]),
                                generator=torch.Generator(device=x.device).manual_seed(0),
                                device=x.device)
    noisy = (x.unsqueeze(1) + noise).flatten(0, 1)  # what SmoothAdv's model sees, at x
    noisy_labels = y.repeat_interleave(M_TEST)

    def generator() -> torch.Generator:
        return torch.Generator(device=x.device).manual_seed(1)

    def repeat(work: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                work()

        return run

    pgd_s, alone_s, smoothadv_s, alone_m_s = interleaved_medians(
        [
            lambda: pgd(model, x, y, threat, steps=steps, generator=generator()),
            repeat(lambda: forward_backward(model, x, y)),
            lambda: smoothadv(model, x, y, threat, SIGMA, m=M_TEST, steps=steps,
                              generator=generator()),
            repeat(lambda: forward_backward(model, noisy, noisy_labels)),
        ],
        repeats,
    )
    common = {"model": name, "input": list(x.shape[1:]), "batch": x.shape[0], "norm": norm,
              "eps": round(EPS[norm], 6), "steps": steps, "device": str(x.device)}
    return [
        {**common, "attack": "pgd", "m": None,
         "attack_ms_per_step": round(1000 * pgd_s / steps, 4),
         "model_alone_ms_per_step": round(1000 * alone_s / steps, 4),
         "ratio": round(pgd_s / alone_s, 4), "target": TARGETS["pgd"]},
        {**common, "attack": "smoothadv", "m": M_TEST, "sigma": SIGMA,
         "attack_ms_per_step": round(1000 * smoothadv_s / steps, 4),
         "model_alone_ms_per_step": round(1000 * alone_m_s / steps, 4),
         "ratio": round(smoothadv_s / alone_m_s, 4), "target": TARGETS["smoothadv"]},
    ]


def tiny_denoised_classifier(sigma: float, device: str) -> nn.Module:
    """DenoiseAndClassify(tiny IF-II, tiny CLIP), the models of `bench.run`'s denoised rows."""
    from denoisers import DENOISERS, DenoiseAndClassify
    from tests.tiny_classifiers import clip_options, save_tiny_clip
    from tests.tiny_models import save_tiny_if2

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        denoiser = DENOISERS.build("if2", sigma=sigma, checkpoint=str(save_tiny_if2(root / "if2")),
                                   device=device, dtype="fp32")
        options = clip_options(save_tiny_clip(root / "clip"), root / "cache")
        classifier = build_classifier("clip-b32", class_names=["cat", "dog", "car"], **options)
    return DenoiseAndClassify(denoiser.to(device).eval(), classifier.to(device).eval(),
                              sigma).eval()


def attack_overhead(repeats: int = 5, device: str = "cpu", threads: int = 1) -> list[dict]:
    """All rows (see the module's docstring); prints a table and returns the rows.

    Runs with `threads` torch threads (1: on a shared 2-core machine two threads ran up to
    10x slower than one, which drowns the ratio), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _attack_rows(repeats, device)
    finally:
        torch.set_num_threads(previous)


def _attack_rows(repeats: int, device: str) -> list[dict]:
    digits = build_classifier("digits", class_names=[str(i) for i in range(10)],
                              sigma=SIGMA).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    print(f"{'attack step vs the model alone':<44} {'input':<8} {'batch':>5} {'norm':<5} "
          f"{'attack ms':>10} {'alone ms':>10} {'ratio':>6} target")
    rows = []

    def add(new_rows: list[dict]) -> None:
        for r in new_rows:  # printed as they come: the whole set takes minutes
            shape = "x".join(map(str, r["input"]))
            label = f"{r['attack']}{' m=' + str(r['m']) if r['m'] else ''} {r['model']}"
            print(f"{label:<44} {shape:<8} {r['batch']:>5} {r['norm']:<5} "
                  f"{r['attack_ms_per_step']:>10.3f} {r['model_alone_ms_per_step']:>10.3f} "
                  f"{r['ratio']:>6.3f} <= {r['target']}", flush=True)
        rows.extend(new_rows)

    for batch in (1, 16):
        x = torch.rand((batch, 1, 8, 8), generator=generator).to(device)
        with torch.no_grad():
            y = digits(x).argmax(dim=1)
        for norm in ("l2", "linf"):
            add(step_costs("digits CNN", digits, x, y, norm, 20, repeats))
    denoised = tiny_denoised_classifier(SIGMA, device)
    x = torch.rand((1, 3, 32, 32), generator=generator).to(device)
    with torch.no_grad():
        y = denoised(x).argmax(dim=1)
    add(step_costs("DenoiseAndClassify(tiny IF-II, tiny CLIP)", denoised, x, y, "l2", 3,
                   max(1, repeats // 2)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench_attacks.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    record = {"torch": torch.__version__, "threads": 1,
              "attacks": attack_overhead(args.repeats, args.device)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
