"""Convert openai/guided-diffusion (ADM) checkpoints to a diffusers `DDPMPipeline` folder.

Carlini et al. (2023) denoise ImageNet with guided-diffusion's unconditional 256 x 256
model, `256x256_diffusion_uncond.pt`: a plain state dict of openai's `UNetModel`. This
module maps that state dict onto a diffusers `UNet2DModel` of the same layout and writes
it, with a `DDPMScheduler` holding the model's noise schedule, as `unet/` + `scheduler/`
(what `DDPMPipeline.save_pretrained` writes), which `denoisers.dds.DDSDenoiser` reads.

    from denoisers.guided_diffusion import PRESETS, convert_checkpoint
    convert_checkpoint("256x256_diffusion_uncond.pt", PRESETS["imagenet256-uncond"], "adm256")

The UNet's hyperparameters are not stored in the checkpoint: they are the flags the model
was trained with (`GuidedDiffusionConfig`, named as guided-diffusion's `create_model`
arguments). A state dict that does not match them, in any key or shape, is refused with
one `GuidedDiffusionCheckpointError` listing what differs. The file is read with
`torch.load(weights_only=True)`: tensors only, nothing unpickled.

Layout correspondence (verified numerically against openai's own `UNetModel` and
`GaussianDiffusion.p_mean_variance` in tests/test_guided_diffusion.py):

- timestep embedding: cos-then-sin sinusoids of width `num_channels` (diffusers
  `flip_sin_to_cos=True, freq_shift=0`), then `time_embed` = Linear, SiLU, Linear;
- each level of `channel_mult` is one down block (`num_res_blocks` ResBlocks, each with an
  AttentionBlock where the level's downsampling factor is in `attention_resolutions`) and
  one up block (`num_res_blocks + 1` ResBlocks); the resampling layer is a ResBlock
  (`resblock_updown`: `ResnetDownsampleBlock2D` / `downsample_type="resnet"`) or a strided
  / nearest-upsampling 3x3 convolution;
- ResBlock = diffusers `ResnetBlock2D` (`scale_shift` time conditioning for
  `use_scale_shift_norm`), GroupNorm(32) everywhere, the middle block's attention included
  (`attn_norm_num_groups=32`: diffusers drops that norm under scale-shift otherwise);
- AttentionBlock's fused 1x1 `qkv` convolution is split into `to_q`, `to_k`, `to_v`.
  guided-diffusion's default ("legacy") order interleaves the three per head
  ([head][q|k|v][channel]); `use_new_attention_order` puts all queries first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from classifiers.weights_io import load_torch_file

# guided-diffusion normalizes with GroupNorm32 throughout.
GROUP_NORM_GROUPS = 32

NOISE_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


class GuidedDiffusionCheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the hyperparameters, or
    hyperparameters that describe no guided-diffusion UNet."""


@dataclass(frozen=True)
class GuidedDiffusionConfig:
    """guided-diffusion's model and diffusion flags (`create_model_and_diffusion` names).

    `attention_resolutions` are image resolutions, as in the flag "32,16,8": attention
    sits at the levels whose feature maps have that size (downsampling factor
    `image_size // resolution`). Only unconditional, epsilon-predicting models with
    `num_head_channels` set (not a fixed `num_heads`) are supported.
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_head_channels: int
    resblock_updown: bool
    use_scale_shift_norm: bool
    learn_sigma: bool
    use_new_attention_order: bool = False
    in_channels: int = 3
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problems = []
        for name in ("image_size", "num_channels", "num_res_blocks", "num_head_channels",
                     "in_channels", "diffusion_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not self.channel_mult or any(
            not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in self.channel_mult
        ):
            problems.append(f"channel_mult must be positive integers, got {self.channel_mult!r}")
        elif self.channel_mult[0] != 1:
            # diffusers sizes the sinusoidal embedding by the first block's width,
            # guided-diffusion by num_channels: they agree only when the first multiplier is 1.
            problems.append(f"channel_mult must start with 1, got {self.channel_mult!r}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            problems.append(
                f"noise_schedule must be one of {sorted(NOISE_SCHEDULES)}, "
                f"got {self.noise_schedule!r}"
            )
        if problems:
            raise GuidedDiffusionCheckpointError("; ".join(problems))

        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            problems.append(
                f"image_size {self.image_size} is not divisible by 2**{levels - 1}, "
                f"the downsampling of {levels} levels"
            )
        factors = {2**level for level in range(levels)}
        for resolution in self.attention_resolutions:
            if (
                not isinstance(resolution, int)
                or resolution < 1
                or self.image_size % resolution
                or self.image_size // resolution not in factors
            ):
                problems.append(
                    f"attention resolution {resolution!r} is the feature-map size of no level "
                    f"(image_size {self.image_size}, {levels} levels)"
                )
        for width in self.block_out_channels:
            if width % GROUP_NORM_GROUPS:
                problems.append(f"channel width {width} is not divisible by {GROUP_NORM_GROUPS}")
        for level in self.attention_levels:
            width = self.block_out_channels[level]
            if width % self.num_head_channels:
                problems.append(
                    f"channel width {width} is not divisible by num_head_channels "
                    f"{self.num_head_channels}"
                )
        if problems:
            raise GuidedDiffusionCheckpointError("; ".join(problems))

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.num_channels * mult for mult in self.channel_mult)

    @property
    def attention_levels(self) -> frozenset[int]:
        """Levels (0 = full resolution) whose blocks have attention."""
        factors = {self.image_size // resolution for resolution in self.attention_resolutions}
        return frozenset(level for level in range(len(self.channel_mult)) if 2**level in factors)

    @property
    def out_channels(self) -> int:
        # A learned variance doubles the output: noise prediction, then variance interpolation.
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def replace(self, **changes: Any) -> GuidedDiffusionConfig:
        """A copy with some fields changed (validated again)."""
        values = asdict(self)
        values.update(changes)
        values["channel_mult"] = tuple(values["channel_mult"])
        values["attention_resolutions"] = tuple(values["attention_resolutions"])
        return GuidedDiffusionConfig(**values)

    def unet_config(self) -> dict[str, Any]:
        """`UNet2DModel` keyword arguments for this layout."""
        down, up = [], []
        for level in range(len(self.channel_mult)):
            attention = level in self.attention_levels
            if attention:
                down.append("AttnDownBlock2D")
            else:
                down.append("ResnetDownsampleBlock2D" if self.resblock_updown else "DownBlock2D")
        for level in reversed(range(len(self.channel_mult))):
            attention = level in self.attention_levels
            if attention:
                up.append("AttnUpBlock2D")
            else:
                up.append("ResnetUpsampleBlock2D" if self.resblock_updown else "UpBlock2D")
        resample = "resnet" if self.resblock_updown else "conv"
        return {
            "sample_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "layers_per_block": self.num_res_blocks,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": down,
            "up_block_types": up,
            "downsample_type": resample,
            "upsample_type": resample,
            "attention_head_dim": self.num_head_channels,
            "resnet_time_scale_shift": "scale_shift" if self.use_scale_shift_norm else "default",
            "norm_num_groups": GROUP_NORM_GROUPS,
            "attn_norm_num_groups": GROUP_NORM_GROUPS,
            "norm_eps": 1e-5,
            "time_embedding_type": "positional",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "act_fn": "silu",
            "dropout": 0.0,
            "downsample_padding": 1,
        }

    def scheduler_config(self) -> dict[str, Any]:
        """`DDPMScheduler` keyword arguments for this model's noise schedule.

        guided-diffusion's "linear" schedule is linspace(1e-4, 0.02) scaled by
        1000 / steps; its "cosine" schedule is diffusers' `squaredcos_cap_v2`.
        """
        scale = 1000 / self.diffusion_steps
        return {
            "num_train_timesteps": self.diffusion_steps,
            "beta_schedule": NOISE_SCHEDULES[self.noise_schedule],
            "beta_start": scale * 0.0001,
            "beta_end": scale * 0.02,
            "prediction_type": "epsilon",
            "variance_type": "learned_range" if self.learn_sigma else "fixed_large",
            "clip_sample": True,
            "clip_sample_range": 1.0,
        }


PRESETS: dict[str, GuidedDiffusionConfig] = {
    # The flags of guided-diffusion's README for 256x256_diffusion_uncond.pt, as Carlini
    # et al.'s diffusion_denoised_smoothing builds the model (use_fp16 False: fp32 weights).
    "imagenet256-uncond": GuidedDiffusionConfig(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        resblock_updown=True,
        use_scale_shift_norm=True,
        learn_sigma=True,
        use_new_attention_order=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        notes="openai/guided-diffusion 256x256_diffusion_uncond.pt (Carlini et al. 2023)",
    ),
}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a guided-diffusion `.pt` state dict with `weights_only=True` (no unpickling)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GuidedDiffusionCheckpointError(f"{path}: no such checkpoint file")
    state = load_torch_file(path, GuidedDiffusionCheckpointError)
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise GuidedDiffusionCheckpointError(
            f"{path} does not hold a flat state dict of tensors (guided-diffusion's "
            "`model.state_dict()`)"
        )
    return dict(state)


# diffusers module name -> guided-diffusion module name inside one ResBlock.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# ... inside one AttentionBlock; q/k/v are slices of the fused qkv convolution.
_ATTENTION = {"group_norm": "norm", "to_q": "qkv", "to_k": "qkv", "to_v": "qkv",
              "to_out.0": "proj_out"}
_QKV_INDEX = {"to_q": 0, "to_k": 1, "to_v": 2}


def _module_pairs(config: GuidedDiffusionConfig) -> list[tuple[str, str, str]]:
    """(diffusers prefix, guided-diffusion prefix, kind) for every module of the UNet.

    Walks guided-diffusion's `UNetModel.__init__` order: `input_blocks` is a flat list
    (conv_in, then per level its ResBlocks [+ attention] and a downsampler),
    `output_blocks` likewise per reversed level.
    """
    pairs = [
        ("conv_in", "input_blocks.0.0", "plain"),
        ("time_embedding.linear_1", "time_embed.0", "plain"),
        ("time_embedding.linear_2", "time_embed.2", "plain"),
        ("conv_norm_out", "out.0", "plain"),
        ("conv_out", "out.2", "plain"),
        ("mid_block.resnets.0", "middle_block.0", "resnet"),
        ("mid_block.attentions.0", "middle_block.1", "attention"),
        ("mid_block.resnets.1", "middle_block.2", "resnet"),
    ]
    levels = len(config.channel_mult)
    index = 1
    for level in range(levels):
        attention = level in config.attention_levels
        for j in range(config.num_res_blocks):
            pairs.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0", "resnet"))
            if attention:
                pairs.append(
                    (f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1", "attention")
                )
            index += 1
        if level != levels - 1:
            if config.resblock_updown:
                pairs.append(
                    (f"down_blocks.{level}.downsamplers.0", f"input_blocks.{index}.0", "resnet")
                )
            else:
                pairs.append(
                    (f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op",
                     "plain")
                )
            index += 1
    index = 0
    for block, level in enumerate(reversed(range(levels))):
        attention = level in config.attention_levels
        for j in range(config.num_res_blocks + 1):
            pairs.append((f"up_blocks.{block}.resnets.{j}", f"output_blocks.{index}.0", "resnet"))
            sub = 1
            if attention:
                pairs.append(
                    (f"up_blocks.{block}.attentions.{j}", f"output_blocks.{index}.1", "attention")
                )
                sub = 2
            if level and j == config.num_res_blocks:
                if config.resblock_updown:
                    pairs.append(
                        (f"up_blocks.{block}.upsamplers.0", f"output_blocks.{index}.{sub}",
                         "resnet")
                    )
                else:
                    pairs.append(
                        (f"up_blocks.{block}.upsamplers.0.conv",
                         f"output_blocks.{index}.{sub}.conv", "plain")
                    )
            index += 1
    return pairs


@dataclass(frozen=True)
class _Source:
    """Where one diffusers parameter comes from in the guided-diffusion state dict."""

    key: str
    shape: tuple[int, ...]  # the guided-diffusion tensor's expected shape
    qkv_index: int | None = None  # 0/1/2: the q/k/v slice of a fused qkv tensor
    squeeze: bool = False  # a 1x1 conv1d weight [C_out, C_in, 1] that becomes a Linear's


def _sources(
    config: GuidedDiffusionConfig, target: Mapping[str, torch.Tensor]
) -> dict[str, _Source]:
    """For each key of the diffusers state dict `target`, its source in guided-diffusion."""
    pairs = sorted(_module_pairs(config), key=lambda pair: -len(pair[0]))
    sources = {}
    for key, tensor in target.items():
        for prefix, adm_prefix, kind in pairs:
            if not key.startswith(prefix + "."):
                continue
            module, _, param = key[len(prefix) + 1:].rpartition(".")
            shape = tuple(tensor.shape)
            if kind == "plain" and not module:
                sources[key] = _Source(f"{adm_prefix}.{param}", shape)
            elif kind == "resnet" and module in _RESNET:
                sources[key] = _Source(f"{adm_prefix}.{_RESNET[module]}.{param}", shape)
            elif kind == "attention" and module in _ATTENTION:
                adm_key = f"{adm_prefix}.{_ATTENTION[module]}.{param}"
                if module in _QKV_INDEX:
                    fused = (3 * shape[0], *shape[1:], 1) if param == "weight" else (3 * shape[0],)
                    sources[key] = _Source(adm_key, fused, qkv_index=_QKV_INDEX[module],
                                           squeeze=param == "weight")
                elif module == "to_out.0" and param == "weight":
                    sources[key] = _Source(adm_key, (*shape, 1), squeeze=True)
                else:
                    sources[key] = _Source(adm_key, shape)
            break
        if key not in sources:
            # The diffusers model has a parameter this mapping does not know: a bug here
            # or a diffusers version with another layout, never the user's checkpoint.
            raise RuntimeError(f"no guided-diffusion counterpart known for diffusers key {key}")
    return sources


def _take(tensor: torch.Tensor, source: _Source, config: GuidedDiffusionConfig) -> torch.Tensor:
    if source.qkv_index is not None:
        channels = tensor.shape[0] // 3
        rest = tensor.shape[1:]
        if config.use_new_attention_order:
            # QKVAttention: chunk into q, k, v first, then split each into heads.
            tensor = tensor.reshape(3, channels, *rest)[source.qkv_index]
        else:
            # QKVAttentionLegacy: split into heads first, each head holding its q, k, v.
            heads = channels // config.num_head_channels
            tensor = tensor.reshape(heads, 3, config.num_head_channels, *rest)
            tensor = tensor[:, source.qkv_index].reshape(channels, *rest)
    if source.squeeze:
        tensor = tensor.squeeze(-1)
    return tensor


def _list(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: GuidedDiffusionConfig
) -> None:
    """Raise `GuidedDiffusionCheckpointError` unless `state_dict` is of `config`'s layout.

    The error names the missing keys, unexpected keys and shape mismatches, all at once.
    Works on meta tensors too (shapes only), so a full-size layout is checked for free.
    """
    _check(state_dict, config, _sources(config, _empty_unet(config).state_dict()))


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: GuidedDiffusionConfig
) -> Any:
    """A diffusers `UNet2DModel` (float32) holding the weights of a guided-diffusion UNet.

    Raises `GuidedDiffusionCheckpointError` (see `check_state_dict`) when `state_dict` is
    not of `config`'s layout.
    """
    # Built on the meta device and filled by assignment: a full-size UNet is not
    # randomly initialized first only to be overwritten.
    unet = _empty_unet(config)
    sources = _sources(config, unet.state_dict())
    _check(state_dict, config, sources)
    converted = {
        key: _take(state_dict[source.key], source, config).to(
            dtype=torch.float32, memory_format=torch.contiguous_format, copy=True
        )
        for key, source in sources.items()
    }
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.eval()


def _empty_unet(config: GuidedDiffusionConfig) -> Any:
    from diffusers import UNet2DModel

    with torch.device("meta"):
        return UNet2DModel(**config.unet_config())


def _check(
    state_dict: Mapping[str, torch.Tensor],
    config: GuidedDiffusionConfig,
    sources: Mapping[str, _Source],
) -> None:
    expected = {source.key: source.shape for source in sources.values()}
    present = set(expected) & set(state_dict)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(state_dict[key].shape)} (expected {expected[key]})"
        for key in present
        if tuple(state_dict[key].shape) != expected[key]
    )
    not_float = sorted(key for key in present if not state_dict[key].is_floating_point())
    if missing or unexpected or mismatched or not_float:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_list(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {_list(mismatched)}")
        if not_float:
            parts.append(f"{len(not_float)} non-floating-point tensors: {_list(not_float)}")
        raise GuidedDiffusionCheckpointError(
            "the checkpoint is not a guided-diffusion UNet with these hyperparameters "
            f"({_describe(config)}): " + "; ".join(parts)
        )


def _describe(config: GuidedDiffusionConfig) -> str:
    fields = asdict(config)
    fields.pop("notes")
    return ", ".join(f"{name}={value}" for name, value in fields.items())


def convert_checkpoint(
    checkpoint: str | Path,
    config: GuidedDiffusionConfig,
    output: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a guided-diffusion `.pt` file into a DDPMPipeline folder at `output`.

    The folder holds `unet/` (safetensors, float32), `scheduler/` and `model_index.json`,
    and loads with `DDSDenoiser.from_pretrained(output, sigma=...)`. An existing `output`
    is refused unless `overwrite`; the folder is written beside it and moved into place
    only when complete, so a failed conversion leaves nothing behind.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    output = Path(output).expanduser()
    if output.exists() and not (overwrite and output.is_dir()):
        what = "folder" if output.is_dir() else "file that is not a folder"
        hint = " (pass overwrite=True / --overwrite to replace it)" if output.is_dir() else ""
        raise FileExistsError(f"{output} already exists as a {what}{hint}")
    unet = convert_state_dict(load_state_dict(checkpoint), config)
    scheduler = DDPMScheduler(**config.scheduler_config())

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output
