"""Distil the small consistency model CMAP uses at digits scale from the bundled digits DDPM.

Consistency distillation (Song et al. 2023, Alg. 2, the "CD" models such as
openai/diffusers-cd_imagenet64_l2): the teacher is the DDPM of `train_digits_ddpm.py`
(epsilon prediction, cosine schedule) read as a variance-exploding denoiser,
D(x_s, s) = x_s - s * eps(x_s / sqrt(1 + s^2), t(s)), since x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps is x_0 + s eps scaled by sqrt(a_t) = 1 / sqrt(1 + s^2), with t(s) the
(fractional) timestep whose noise level sqrt((1 - a_t) / a_t) is s. On the Karras grid
s_0 < ... < s_{N-1} of a `CMStochasticIterativeScheduler` (N = 18, EDM's range 0.002..80,
rho 7), one Heun step of the teacher's probability-flow ODE from s_{n+1} to s_n gives
x_hat_n, and the student f (diffusers' consistency parameterization, the
`ConsistencyFunction` CMAP generates with) is trained with the L2 metric
||f(x_{n+1}, s_{n+1}) - f_target(x_hat_n, s_n)||^2, the target being an EMA of the student
(decay 0.95, CD's CIFAR-10 setting, with diffusers' EMA warm-up). The student starts from
the teacher's weights (as in CD); its UNet has the teacher's configuration.

    python -m denoisers.train_digits_cm               # train, save, evaluate
    python -m denoisers.train_digits_cm --evaluate    # evaluate the saved model

The output is a `ConsistencyModelPipeline.save_pretrained` folder (unet/, scheduler/,
safetensors) plus `training.json` (settings, loss, evaluation).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from denoisers.train_digits_ddpm import DEFAULT_OUT as DDPM_DIR

DEFAULT_OUT = Path(__file__).resolve().parent / "weights" / "digits_cm"


class TeacherDenoiser(torch.nn.Module):
    """The DDPM as a variance-exploding denoiser D(x_s, s) in [-1, 1] space."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        levels = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().double()
        self.log_levels = levels.log()  # increasing in t

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of noise level sigma (linear in log sigma between steps),
        clamped to [0, T - 1]."""
        log_sigma = sigma.double().log().clamp(self.log_levels[0], self.log_levels[-1])
        upper = torch.searchsorted(self.log_levels, log_sigma).clamp(1, len(self.log_levels) - 1)
        lo, hi = self.log_levels[upper - 1], self.log_levels[upper]
        return (upper - 1 + (log_sigma - lo) / (hi - lo)).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1)
        eps = self.unet(x / (1 + s**2).sqrt(), self.timestep(sigma), return_dict=False)[0]
        return x - s * eps


def heun_step(
    teacher: TeacherDenoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Heun step of dx/ds = (x - D(x, s)) / s from sigma to sigma_next (EDM Alg. 1)."""
    s, s_next = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    slope = (x - teacher(x, sigma)) / s
    euler = x + (s_next - s) * slope
    slope_next = (euler - teacher(euler, sigma_next)) / s_next
    return x + (s_next - s) * (slope + slope_next) / 2


def train(out: Path, steps: int, batch_size: int, lr: float, num_scales: int, seed: int,
          threads: int) -> dict[str, Any]:
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDPMPipeline
    from diffusers.training_utils import EMAModel

    from denoisers.purifiers.cmap import ConsistencyFunction
    from denoisers.train_digits_ddpm import _load_train_images

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    ddpm = DDPMPipeline.from_pretrained(DDPM_DIR, use_safetensors=True)
    teacher = TeacherDenoiser(ddpm.unet, ddpm.scheduler.alphas_cumprod)
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=num_scales, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
        rho=7.0, clip_denoised=True,
    )
    grid = scheduler.sigmas.float()  # decreasing: s_{N-1} ... s_0
    grid = grid.flip(0)  # increasing
    student_unet = copy.deepcopy(ddpm.unet).train().requires_grad_(True)
    student = ConsistencyFunction(student_unet, scheduler)
    student.unet.train().requires_grad_(True)  # ConsistencyFunction freezes; training here
    target = copy.deepcopy(student).requires_grad_(False)
    ema = EMAModel(student.unet.parameters(), decay=0.95, use_ema_warmup=False)
    optimizer = torch.optim.Adam(student.unet.parameters(), lr=lr)

    images = _load_train_images() * 2 - 1
    losses: list[float] = []
    perm, cursor = torch.randperm(len(images), generator=gen), 0
    start = time.perf_counter()
    for step in range(steps):
        if cursor + batch_size > len(perm):
            perm, cursor = torch.cat([perm[cursor:], torch.randperm(len(images), generator=gen)]), 0
        x0 = images[perm[cursor : cursor + batch_size]]
        cursor += batch_size
        n = torch.randint(0, num_scales - 1, (x0.shape[0],), generator=gen)
        sigma, sigma_next = grid[n + 1], grid[n]
        x_sigma = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            x_hat = heun_step(teacher, x_sigma, sigma, sigma_next)
            wanted = target(x_hat, sigma_next)
        loss = (student(x_sigma, sigma) - wanted).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.unet.parameters(), 1.0)
        optimizer.step()
        ema.step(student.unet.parameters())
        ema.copy_to(target.unet.parameters())
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step + 1}/{steps}  loss(last 50) {recent:.5f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    train_seconds = time.perf_counter() - start

    unet = target.unet.eval()  # the EMA target network, as CD samples with
    out.mkdir(parents=True, exist_ok=True)
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(
        out, safe_serialization=True
    )
    for file in out.rglob("*"):
        if file.is_file():
            file.chmod(0o644)
    import diffusers

    tail = losses[-100:]
    return {
        "method": "consistency distillation (Song et al. 2023, Alg. 2), L2 metric, Heun solver",
        "teacher": "denoisers/weights/digits_ddpm (epsilon DDPM read as a VE denoiser)",
        "data": "classifiers.digits.load_digits_split('train'), scaled to [-1, 1] as 2x - 1",
        "num_train_images": len(images),
        "scheduler": {"class": "diffusers.CMStochasticIterativeScheduler",
                      "num_train_timesteps": num_scales, "sigma_min": 0.002,
                      "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0},
        "init": "teacher's UNet weights",
        "target_ema": "decay 0.95 (diffusers EMAModel, (1+k)/(10+k) warm-up)",
        "saved_weights": "target (EMA) network",
        "steps": steps,
        "batch_size": batch_size,
        "optimizer": f"Adam lr {lr}, grad-norm clip 1.0",
        "seed": seed,
        "threads": threads,
        "final_loss_mean_last_100_steps": sum(tail) / len(tail),
        "train_seconds": round(train_seconds, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
    }


@torch.no_grad()
def evaluate(path: Path, samples: int = 500, cmap_images: int = 50, seed: int = 0) -> dict:
    """One-step samples judged by `digits-clean`, and CMAP (default settings) on the first
    `cmap_images` test images: accuracy of the vote and of the classifier alone."""
    from classifiers import build_classifier
    from classifiers.digits import CLASS_NAMES, load_digits_split
    from denoisers.purifiers.cmap import ConsistencyFunction, build

    model = ConsistencyFunction.from_pretrained(path)
    classifier = build_classifier("digits-clean", class_names=CLASS_NAMES).eval()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((samples, 1, 8, 8), generator=gen)
    probabilities = classifier(model.generate(z)).softmax(1)
    histogram = torch.bincount(probabilities.argmax(1), minlength=10)

    test = load_digits_split("test")
    x, y = test.images[:cmap_images], test.labels[:cmap_images]
    purified = build(classifier=classifier, checkpoint=path).eval()
    purified.generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    images = purified.purifier.purify_all(x, purified.generator)
    seconds = time.perf_counter() - start
    logits = classifier(images.flatten(0, 1)).view(len(x), -1, 10)
    from denoisers.purifiers.cmap import majority_vote

    vote = majority_vote(logits).argmax(1)
    return {
        "one_step_samples": samples,
        "sample_mean_max_probability_digits_clean": float(probabilities.max(1).values.mean()),
        "sample_class_histogram": histogram.tolist(),
        "cmap_test_images": cmap_images,
        "cmap_settings": "defaults of denoisers.purifiers.cmap.build",
        "accuracy_classifier_alone": float((classifier(x).argmax(1) == y).float().mean()),
        "accuracy_cmap_vote": float((vote == y).float().mean()),
        "accuracy_cmap_first_image": float((logits[:, 0].argmax(1) == y).float().mean()),
        "mae_generated_to_input": float((images - x[:, None]).abs().mean()),
        "cmap_seconds_per_image": round(seconds / cmap_images, 3),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the saved model")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--num-scales", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record_path = args.out / "training.json"
    if args.evaluate:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    else:
        record = train(args.out, args.steps, args.batch_size, args.lr, args.num_scales,
                       args.seed, args.threads)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    record["evaluation"] = evaluate(args.out)
    print(json.dumps(record["evaluation"], indent=2))
    record_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
