"""Train the shipped digits CNN with Gaussian noise augmentation (Cohen et al., 2019, Sec. 4).

    python -m classifiers.train_digits --sigma 0.25 \
        --out classifiers/weights/digits_cnn_sigma0.25.safetensors

Trains on the digits TRAIN split only, on the CPU, deterministically: every
random draw (initialization, shuffling, noise) comes from seeded generators.
Noise N(0, sigma^2 I) is added in [0, 1] pixel space, where the smoothing
engine adds it, without clipping; sigma 0 trains on clean images. Writes the
weights (safetensors) and a JSON beside them (same stem) with the settings and
the final clean and noisy accuracy on the TEST split.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click
import safetensors
import sklearn
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from classifiers.digits import DigitsCNN, load_digits_split


def noisy_accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: float,
    draws: int,
    generator: torch.Generator,
) -> float:
    """Mean accuracy of `model` on `images` + N(0, sigma^2), over `draws` noise draws each."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for _ in range(draws if sigma > 0 else 1):
            noisy = images + sigma * torch.randn(images.shape, generator=generator)
            correct += int((model(noisy).argmax(dim=1) == labels).sum())
    return correct / (len(labels) * (draws if sigma > 0 else 1))


def train(
    sigma: float,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    noise_copies: int,
    seed: int,
) -> tuple[DigitsCNN, list[float]]:
    """Train a DigitsCNN on the train split; returns it (eval mode) and the loss of each epoch."""
    train_set = load_digits_split("train")
    images, labels = train_set.images, train_set.labels
    # each epoch sees every image `noise_copies` times, each time under fresh noise
    images = images.repeat(noise_copies, 1, 1, 1)
    labels = labels.repeat(noise_copies)

    torch.manual_seed(seed)  # initialization of the layers
    model = DigitsCNN()
    shuffle_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator().manual_seed(seed + 2)

    steps_per_epoch = -(-len(labels) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=shuffle_gen)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            x = images[idx]
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=noise_gen)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        losses.append(total / len(labels))
    return model.eval(), losses


@click.command()
@click.option(
    "--sigma", type=float, required=True, help="Noise level of the augmentation (0 = clean)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Weights file to write (.safetensors); a .json with the same stem is written beside it.",
)
@click.option("--epochs", type=int, default=150, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--weight-decay", type=float, default=1e-2, show_default=True)
@click.option(
    "--noise-copies",
    type=int,
    default=8,
    show_default=True,
    help="Noisy copies of every training image per epoch.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads.")
@click.option("--eval-draws", type=int, default=20, show_default=True,
              help="Noise draws per test image for the noisy accuracy.")
def main(
    sigma: float,
    out: Path,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    noise_copies: int,
    seed: int,
    threads: int,
    eval_draws: int,
) -> None:
    """Train the digits CNN at noise level SIGMA and write its weights to OUT."""
    if sigma < 0:
        raise click.BadParameter("must be >= 0", param_hint="--sigma")
    if out.suffix != ".safetensors":
        raise click.BadParameter("must end in .safetensors", param_hint="--out")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)

    started = time.time()
    model, losses = train(sigma, epochs, batch_size, lr, weight_decay, noise_copies, seed)
    train_seconds = time.time() - started

    test_set = load_digits_split("test")
    eval_gen = torch.Generator().manual_seed(seed + 3)
    accuracy = {"clean": noisy_accuracy(model, test_set.images, test_set.labels, 0.0, 1, eval_gen)}
    for s in sorted({0.25, 0.5} | ({sigma} if sigma > 0 else set())):
        accuracy[f"noisy_sigma{s:.2f}"] = noisy_accuracy(
            model, test_set.images, test_set.labels, s, eval_draws, eval_gen
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"model": "DigitsCNN", "train_sigma": f"{sigma}"})
    record = {
        "model": "DigitsCNN",
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": out.name,
        "command": "python -m classifiers.train_digits "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in dict(
                sigma=sigma, out=out.as_posix(), epochs=epochs, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, noise_copies=noise_copies, seed=seed, threads=threads,
                eval_draws=eval_draws,
            ).items()
        ),
        "settings": {
            "train_sigma": sigma,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "AdamW",
            "schedule": "OneCycleLR",
            "lr": lr,
            "weight_decay": weight_decay,
            "noise_copies": noise_copies,
            "seed": seed,
            "threads": threads,
            "train_split": "digits train (1347 images)",
        },
        "final_train_loss": losses[-1],
        "test_accuracy": accuracy,
        "test_accuracy_note": f"digits test split (450 images); noisy = mean over {eval_draws} "
        "noise draws per image",
        "train_seconds": round(train_seconds, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "scikit-learn": sklearn.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps({"out": str(out), "test_accuracy": accuracy,
                           "train_seconds": record["train_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
