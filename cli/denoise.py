"""`denoise`: look at what a denoiser makes of noisy images before spending GPU hours.

A PNG grid in the manner of Choi et al. (2024), Fig. 3 and Fig. 7: one row per
image; columns clean, then for each sigma the noisy input and the denoised
output for each correction factor k.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click
import torch

import classifiers
from classifiers.datasets import UnreadableImageError
from cli.errors import CommandError
from cli.options import (
    DENOISER_OPTIONS,
    DEVICE_OPTIONS,
    apply,
    build_denoiser,
    denoiser_choice,
    resolve_device,
)
from cli.protocol_options import PROTOCOL_OPTIONS, resolve_protocol
from smoothing.noise import gaussian_noise
from smoothing.runner import example_generator


def _numbers(kind: type, flag: str, positive: bool = True):
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list:
        try:
            numbers = [kind(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}",
                                     param_hint=flag) from None
        if not numbers:
            raise click.BadParameter("give at least one value", param_hint=flag)
        if any(not v > 0 if positive else v < 0 for v in numbers):
            raise click.BadParameter(f"values must be {'> 0' if positive else '>= 0'}",
                                     param_hint=flag)
        return numbers

    return parse


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--dataset", default="digits", help="Dataset name, or folder:PATH.")
@click.option("--split", default="test")
@click.option("--data-root", type=click.Path(file_okay=False))
@click.option("--indices", default="0,1,2,3", callback=_numbers(int, "--indices", positive=False),
              help="Dataset indices of the images to show (one row each).")
@click.option("--sigmas", default="0.25,0.5,1.0", callback=_numbers(float, "--sigmas"),
              help="Noise levels (std in [0, 1] pixel space), one column group each.")
@click.option("--k", "ks", default="1.8", callback=_numbers(float, "--k", positive=False),
              help="if2: correction factors t' = k t (>= 0), one denoised column each "
                   "(try 0,1,1.8,2.5).")
@apply([denoiser_choice(allow_none=False), *DENOISER_OPTIONS, *PROTOCOL_OPTIONS,
        *DEVICE_OPTIONS])
@click.option("--seed", type=int, default=0, help="Noise seed (the runner's seeding rule).")
@click.option("--out", type=click.Path(dir_okay=False), default="runs/denoise.png")
@click.option("--overwrite", is_flag=True, help="Replace an existing picture.")
@click.option("--skip-unreadable", is_flag=True,
              help="Leave out an image file that cannot be decoded (named on stderr) and draw "
                   "the others [default: stop there, naming the file].")
def denoise_command(**options: Any) -> None:
    """Draw clean / noisy / denoised images side by side as a PNG grid."""
    out = Path(options["out"]).with_suffix(".png")
    if out.exists() and not options["overwrite"]:
        raise CommandError(f"{out} exists; pass --overwrite to replace it")
    if options["denoiser"] != "if2" and options["ks"] != [1.8]:
        raise click.UsageError("--k applies to --denoiser if2 only")
    _check_writable(out)  # before the denoisers run, not after: the work would be lost
    device = resolve_device(options["device"])
    protocol, _ = resolve_protocol(options)
    try:
        if protocol is None:
            dataset = classifiers.build_dataset(
                options["dataset"], split=options["split"], data_root=options["data_root"]
            )
        else:  # the protocol's preprocessing; its prompt and rounding are in `options`
            dataset = protocol.build_dataset(
                options["dataset"], split=options["split"], data_root=options["data_root"]
            )
        bad = [i for i in options["indices"] if i >= len(dataset)]
        if bad:
            raise ValueError(f"--indices {bad} past the end of the dataset ({len(dataset)})")
        indices, images = _read_images(dataset, options["indices"], options["skip_unreadable"])
        images = images.to(device)
        first = build_denoiser(options, options["sigmas"][0], options["ks"][0], device)
        # every (sigma, k) is built before any work, so a refused one costs nothing
        built = {
            (sigma, k): first.at(sigma, k) if options["denoiser"] == "if2" else first.at(sigma)
            for sigma in options["sigmas"] for k in options["ks"]
        }
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise CommandError(str(error)) from error

    columns: list[tuple[str, torch.Tensor]] = [("clean", images)]
    with torch.inference_mode():
        for sigma in options["sigmas"]:
            # image i's noise: the runner's seeding rule and the engine's sampler, so on the
            # CPU it is certify's first noisy copy of image i (when C*H*W is a multiple of 16,
            # torch's pairing block: 8x8, 32x32, 224x224 images)
            noisy = images + torch.stack([
                gaussian_noise(image.shape, sigma, example_generator(options["seed"], i, device))
                for i, image in zip(indices, images, strict=True)
            ])
            columns.append((f"noisy σ={sigma:g}", noisy))
            for k in options["ks"]:
                denoiser = built[sigma, k]
                title = f"{options['denoiser']} σ={sigma:g}"
                if options["denoiser"] == "if2":
                    title += f" k={k:g}"
                columns.append((title, denoiser(noisy, sigma)))
    try:
        _draw(columns, out)
    except OSError as error:  # e.g. the disk filled up while the denoisers ran
        raise CommandError(f"cannot write {out}: {error}") from error
    click.echo(f"wrote {out}")


def _read_images(
    dataset: Any, indices: list[int], skip_unreadable: bool
) -> tuple[list[int], torch.Tensor]:
    """The images at `indices` as one batch, and the indices read; an unreadable file stops
    the command naming it, or with `skip_unreadable` is left out and named on stderr."""
    kept, images = [], []
    for index in indices:
        try:
            images.append(dataset[index][0])
        except UnreadableImageError as error:
            if not skip_unreadable:
                raise
            click.echo(f"skipped index {index}: {error}", err=True)
            continue
        kept.append(index)
    if not images:
        raise ValueError(f"none of --indices {indices} could be read; nothing to draw")
    return kept, torch.stack(images)


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written, writing nothing that stays.

    os.access alone would not do: root passes it everywhere, even on a read-only mount.
    So a temporary file is created (and removed) in the nearest folder that exists.
    """
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; give a file name such as {out / 'grid.png'}")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CommandError(f"cannot write --out {out}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CommandError(
            f"cannot write --out {out}: {folder} is not writable ({error})"
        ) from None


def _draw(columns: list[tuple[str, torch.Tensor]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = columns[0][1].shape[0]
    figure = Figure(figsize=(1.6 * len(columns), 1.6 * rows + 0.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, len(columns), squeeze=False)
    for column, (title, batch) in enumerate(columns):
        # noisy inputs leave [0, 1]; clip only for display
        pictures = batch.detach().float().clamp(0, 1).cpu()
        for row in range(rows):
            axis = axes[row][column]
            picture = pictures[row]
            if picture.shape[0] == 1:
                axis.imshow(picture[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(picture.permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
