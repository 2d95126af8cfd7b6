"""`convert-guided-diffusion`: an openai/guided-diffusion checkpoint -> a `dds` denoiser folder.

    convert-guided-diffusion 256x256_diffusion_uncond.pt models/adm256-uncond
    certify --denoiser dds --denoiser-checkpoint models/adm256-uncond ...

The model's hyperparameters come from `--preset` (the flags it was trained with); any of
them can be overridden for another guided-diffusion UNet of the same family.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from cli.errors import CommandError
from cli.options import apply
from denoisers.guided_diffusion import (
    NOISE_SCHEDULES,
    PRESETS,
    GuidedDiffusionCheckpointError,
    GuidedDiffusionConfig,
)


def _integers(flag: str):
    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            numbers = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(
                f"expected comma-separated integers, got {value!r}", param_hint=flag
            ) from None
        if not numbers:
            raise click.BadParameter("give at least one value", param_hint=flag)
        return numbers

    return parse


_FIELD_OPTIONS = [
    click.option("--image-size", type=int, help="Training resolution (sample_size)."),
    click.option("--num-channels", type=int, help="Base channel width."),
    click.option("--num-res-blocks", type=int, help="ResBlocks per level."),
    click.option("--channel-mult", callback=_integers("--channel-mult"),
                 help="Width multiplier per level, e.g. 1,1,2,2,4,4."),
    click.option("--attention-resolutions", callback=_integers("--attention-resolutions"),
                 help="Feature-map sizes with attention, e.g. 32,16,8."),
    click.option("--num-head-channels", type=int, help="Channels per attention head."),
    click.option("--resblock-updown/--no-resblock-updown", default=None,
                 help="Resample with ResBlocks (else with convolutions)."),
    click.option("--use-scale-shift-norm/--no-use-scale-shift-norm", default=None,
                 help="Scale-shift time conditioning (else additive)."),
    click.option("--learn-sigma/--no-learn-sigma", default=None,
                 help="Learned variance: twice the image channels out."),
    click.option("--use-new-attention-order/--no-use-new-attention-order", default=None,
                 help="QKVAttention (else the default QKVAttentionLegacy)."),
    click.option("--diffusion-steps", type=int, help="Training timesteps."),
    click.option("--noise-schedule", type=click.Choice(sorted(NOISE_SCHEDULES)),
                 help="Beta schedule."),
]
_FIELDS = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
    "num_head_channels", "resblock_updown", "use_scale_shift_norm", "learn_sigma",
    "use_new_attention_order", "diffusion_steps", "noise_schedule",
)


def _preset_values() -> str:
    lines = []
    for name, config in sorted(PRESETS.items()):
        values = ", ".join(f"{k}={v}" for k, v in asdict(config).items() if k != "notes")
        lines.append(f"{name} ({config.notes}): {values}")
    return "\b\nPresets:\n" + "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
               epilog=_preset_values())
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="imagenet256-uncond",
              help="Published hyperparameters of the checkpoint; the options below override.")
@apply(_FIELD_OPTIONS)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT folder.")
def convert_command(checkpoint: str, output: str, preset: str, overwrite: bool,
                    **fields: Any) -> None:
    """Convert a guided-diffusion UNet state dict (.pt) into a DDPMPipeline folder.

    OUTPUT gets unet/ (diffusers UNet2DModel, safetensors, float32) and scheduler/
    (DDPMScheduler with the model's noise schedule): the layout `certify --denoiser dds
    --denoiser-checkpoint OUTPUT` reads. The .pt file is read with weights_only=True.
    """
    from denoisers.guided_diffusion import convert_checkpoint

    changes = {name: fields[name] for name in _FIELDS if fields.get(name) is not None}
    try:
        config: GuidedDiffusionConfig = PRESETS[preset].replace(**changes)
        written = convert_checkpoint(checkpoint, config, output, overwrite=overwrite)
    except (GuidedDiffusionCheckpointError, OSError) as error:  # OSError: exists, unwritable
        raise CommandError(str(error)) from error
    click.echo(
        f"wrote {written} ({'learned' if config.learn_sigma else 'fixed'}-variance UNet, "
        f"{config.noise_schedule} schedule, {config.diffusion_steps} steps); use it with "
        f"`certify --denoiser dds --denoiser-checkpoint {written}`"
    )
