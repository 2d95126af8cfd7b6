"""Train the small pixel-space DDPM shipped for denoised smoothing on the 8x8 digits.

The model is a diffusers `UNet2DModel` (epsilon prediction) with a 1000-step
`DDPMScheduler`, trained with the standard DDPM loss ||eps - eps_theta(x_t, t)||^2
(t uniform over all steps) on the *train* split of `classifiers.digits`, images
mapped from [0, 1] to [-1, 1]. It is then used as a one-shot denoiser (Carlini et
al. 2023; seed 004, Eq. 4-6): a noisy image x + N(0, sigma^2) in [0, 1] is, in
[-1, 1], a clean image plus noise of std 2*sigma, which Eq. 6 matches to the
timestep t with sqrt((1 - a_t) / a_t) = 2*sigma; scaling by sqrt(a_t) turns it
into a sample x_t of the forward process and one epsilon prediction gives x_0.

Schedule: "squaredcos_cap_v2" (the cosine schedule, also DeepFloyd IF's). The
noise levels denoised smoothing needs (2*sigma in 0.5..2, i.e. a_t in 0.8..0.2)
fall at t = 289..702 under it, so uniform-t training spends about 40% of its
steps there; the linear schedule crowds them into t = 145..396 and spends most
steps on near-pure noise, which one-shot denoising never uses.

Usage (from the repository root):

    python -m denoisers.train_digits_ddpm                 # train, save, evaluate
    python -m denoisers.train_digits_ddpm --evaluate      # evaluate the saved weights

The output folder is a standard `DDPMPipeline.save_pretrained` layout
(model_index.json, unet/, scheduler/, safetensors) plus `training.json` with the
settings, the final loss and the evaluation figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OUT = Path(__file__).resolve().parent / "weights" / "digits_ddpm"
EVAL_SIGMAS = (0.25, 0.5, 1.0)


def build_unet(
    block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 2
) -> nn.Module:
    """A small UNet for [B, 1, 8, 8] inputs: 8x8 and 4x4 levels, self-attention at 4x4."""
    from diffusers import UNet2DModel

    if len(block_out_channels) != 2:
        raise ValueError("the digits UNet has exactly two resolution levels (8x8, 4x4)")
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        # 8 groups: the default 32 would leave one channel per group at width 32
        norm_num_groups=8,
        attention_head_dim=32,
    )


def build_scheduler(num_train_timesteps: int = 1000) -> Any:
    """The training noise schedule (see the module docstring for the choice of cosine)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
    )


def _load_train_images() -> torch.Tensor:
    from classifiers.digits import load_digits_split

    data = load_digits_split("train")
    return torch.stack([data[i][0] for i in range(len(data))])


def train(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    ema_decay: float,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    seed: int,
    threads: int | None,
) -> dict[str, Any]:
    """Train the UNet, save the EMA weights as a DDPMPipeline in `out`, return the run's record."""
    from diffusers import DDPMPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)  # the UNet's initial weights
    gen = torch.Generator().manual_seed(seed)  # batches, timesteps, noise

    images = _load_train_images() * 2 - 1  # [N, 1, 8, 8] in [-1, 1]
    unet = build_unet(block_out_channels, layers_per_block)
    scheduler = build_scheduler()
    num_t = scheduler.config.num_train_timesteps

    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    # EMA with warm-up: the decay grows from 0 towards ema_decay, so a short run
    # is not dominated by the random initial weights.
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=2 / 3)

    losses: list[float] = []
    perm = torch.randperm(len(images), generator=gen)
    cursor = 0
    unet.train()
    start = time.perf_counter()
    for step in range(steps):
        # epoch-wise shuffling without dropping images: refill the permutation when short
        if cursor + batch_size > len(perm):
            perm = torch.cat([perm[cursor:], torch.randperm(len(images), generator=gen)])
            cursor = 0
        x0 = images[perm[cursor : cursor + batch_size]]
        cursor += batch_size
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, num_t, (x0.shape[0],), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        loss = nn.functional.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            recent = sum(losses[-100:]) / len(losses[-100:])
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1}/{steps}  loss(last 100) {recent:.4f}  {elapsed:.0f}s", flush=True
            )
    train_seconds = time.perf_counter() - start

    ema.copy_to(unet.parameters())
    unet.eval()
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out, safe_serialization=True)
    # the safetensors writer leaves the weights owner-only (0600); shipped files must be readable
    for file in out.rglob("*"):
        if file.is_file():
            file.chmod(0o644)

    import diffusers

    tail = losses[-100:]
    return {
        "data": "classifiers.digits.load_digits_split('train'), scaled to [-1, 1] as 2x - 1",
        "num_train_images": len(images),
        "augmentation": "none",
        "unet": {
            "class": "diffusers.UNet2DModel",
            "block_out_channels": list(block_out_channels),
            "layers_per_block": layers_per_block,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "norm_num_groups": 8,
            "parameters": sum(p.numel() for p in unet.parameters()),
        },
        "scheduler": {
            "class": "diffusers.DDPMScheduler",
            "num_train_timesteps": num_t,
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "epsilon",
        },
        "loss": "mse(eps_theta(x_t, t), eps), t ~ U{0..T-1}",
        "steps": steps,
        "batch_size": batch_size,
        "optimizer": "AdamW, weight_decay 0, grad-norm clip 1.0",
        "lr": lr,
        "lr_schedule": f"cosine with {warmup_steps} warm-up steps",
        "ema": {"decay": ema_decay, "warmup": "diffusers EMAModel, power 2/3"},
        "saved_weights": "EMA",
        "seed": seed,
        "threads": torch.get_num_threads(),
        "final_loss_mean_last_100_steps": sum(tail) / len(tail),
        "train_seconds": round(train_seconds, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }


@torch.no_grad()
def evaluate(
    path: Path, sigmas: tuple[float, ...] = EVAL_SIGMAS, draws: int = 4, seed: int = 0
) -> dict[str, Any]:
    """One-shot denoising quality of the saved model on the digits *test* split.

    Denoises with the project's `dds` denoiser (`denoisers.dds.DDSDenoiser`), the one
    `certify --denoiser dds` uses. For each sigma, `draws` independent noise draws per
    test image: MSE to the clean image of the noisy image (raw, and clipped to [0, 1])
    and of the denoised one, and the accuracy of `digits-clean` on each.
    """
    from classifiers import build_classifier
    from classifiers.digits import CLASS_NAMES, load_digits_split
    from denoisers.dds import DDSDenoiser

    denoiser = DDSDenoiser.from_pretrained(path, sigma=sigmas[0]).eval()
    test = load_digits_split("test")
    clean = test.images.repeat(draws, 1, 1, 1)
    labels = test.labels.repeat(draws)
    classifier = build_classifier("digits-clean", class_names=CLASS_NAMES).eval()

    def accuracy(images: torch.Tensor) -> float:
        return int((classifier(images).argmax(1) == labels).sum()) / len(labels)

    result: dict[str, Any] = {
        "split": "test",
        "num_images": len(test),
        "noise_draws_per_image": draws,
        "seed": seed,
        "classifier": "digits-clean",
        "clean_accuracy": accuracy(clean),
        "sigmas": {},
    }
    gen = torch.Generator().manual_seed(seed)
    for sigma in sigmas:
        at_sigma = denoiser.at(sigma)
        noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
        denoised = at_sigma.denoise(noisy)
        result["sigmas"][str(sigma)] = {
            "timestep": int(at_sigma.timestep),
            "mse_noisy": float((noisy - clean).pow(2).mean()),
            "mse_noisy_clipped": float((noisy.clamp(0, 1) - clean).pow(2).mean()),
            "mse_denoised": float((denoised - clean).pow(2).mean()),
            "acc_noisy": accuracy(noisy),
            "acc_denoised": accuracy(denoised),
        }
    return result


def _print_evaluation(ev: dict[str, Any]) -> None:
    print(f"test split, {ev['num_images']} images x {ev['noise_draws_per_image']} noise draws")
    print(f"digits-clean accuracy on clean images: {ev['clean_accuracy']:.4f}")
    for sigma, row in ev["sigmas"].items():
        print(
            f"sigma {sigma:>4}  t={row['timestep']:3d}  MSE noisy {row['mse_noisy']:.4f}"
            f" (clipped {row['mse_noisy_clipped']:.4f})  denoised {row['mse_denoised']:.4f}"
            f"  acc noisy {row['acc_noisy']:.4f}  denoised {row['acc_denoised']:.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="pipeline folder")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the saved model")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--channels", type=int, nargs=2, default=(32, 64), metavar=("C1", "C2"))
    parser.add_argument("--layers-per-block", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps runs bit-reproducible and was faster on a shared 2-core box",
    )
    parser.add_argument("--eval-draws", type=int, default=4, help="noise draws per test image")
    args = parser.parse_args(argv)

    record_path = args.out / "training.json"
    if args.evaluate:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        ev = evaluate(args.out, draws=args.eval_draws)
        _print_evaluation(ev)
        if record_path.is_file():  # keep the record's figures in step with the weights
            record = json.loads(record_path.read_text())
            record["evaluation"] = ev
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        return

    record = train(
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        block_out_channels=tuple(args.channels),
        layers_per_block=args.layers_per_block,
        seed=args.seed,
        threads=args.threads,
    )
    record["evaluation"] = evaluate(args.out, draws=args.eval_draws)
    _print_evaluation(record["evaluation"])
    record_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
