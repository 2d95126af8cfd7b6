"""The guided-diffusion -> diffusers converter, checked against openai's own code.

The oracle is openai/guided-diffusion's `UNetModel` and `GaussianDiffusion` as packaged
on PyPI by `guided-diffusion-sdk` (a test dependency). That package's `unet.py` differs
from openai's repository in one line (AttentionBlock passes its `use_checkpoint` flag to
gradient checkpointing instead of True), which changes nothing in a forward pass;
`p_mean_variance` and the beta schedules are openai's unchanged (the package only adds
sampling loops). Carlini et al.'s `diffusion_denoised_smoothing` vendors the same files.

Tiny models of the 256x256 uncond layout (ResBlock up/down sampling, scale-shift norm,
multi-head attention at the low-resolution levels, learned sigma) get random weights,
not the zero-initialized output layers guided-diffusion starts with, so that every
parameter reaches the output. They are saved with torch.save, converted through the same
function (or command) a user calls, and loaded back with from_pretrained.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from cli.convert import convert_command
from denoisers import build_denoiser
from denoisers.dds import DDSDenoiser
from denoisers.guided_diffusion import (
    PRESETS,
    GuidedDiffusionCheckpointError,
    GuidedDiffusionConfig,
    check_state_dict,
    convert_checkpoint,
    convert_state_dict,
)
from tests.cli_helpers import invoke
from tests.tiny_models import go_offline, one_thread

with warnings.catch_warnings():
    # The package decorates its checkpointing with torch.cuda.amp.custom_fwd (deprecated).
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
    from guided_diffusion.script_util import create_gaussian_diffusion, create_model

# The 256x256 uncond flags, shrunk: 4 levels of 32/32/64/64 channels, attention at the
# 8x8 and 4x4 levels of a 32x32 input with 4 heads of 16 channels.
TINY = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 2,
    "channel_mult": (1, 1, 2, 2),
    "attention_resolutions": (8, 4),
    "num_head_channels": 16,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "learn_sigma": True,
    "use_new_attention_order": False,
}
TINY_OPTIONS = [
    "--image-size", "32", "--num-channels", "32", "--channel-mult", "1,1,2,2",
    "--attention-resolutions", "8,4", "--num-head-channels", "16",
]


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def original_model(flags: dict, seed: int = 0) -> torch.nn.Module:
    """openai's UNetModel for `flags`, with random weights that all reach the output."""
    model = create_model(
        image_size=flags["image_size"],
        num_channels=flags["num_channels"],
        num_res_blocks=flags["num_res_blocks"],
        channel_mult=",".join(str(m) for m in flags["channel_mult"]),
        learn_sigma=flags["learn_sigma"],
        attention_resolutions=",".join(str(r) for r in flags["attention_resolutions"]),
        num_head_channels=flags["num_head_channels"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
        use_new_attention_order=flags["use_new_attention_order"],
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() > 1:  # weights: unit-variance outputs
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
            elif "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight",
                                                  "out.0.weight")):
                parameter.copy_(1.0 + 0.1 * noise)  # GroupNorm scales around 1
            else:
                parameter.copy_(0.1 * noise)
    return model.eval()


def save_original(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def carlini_timestep(diffusion, sigma: float) -> int:
    """Carlini et al.'s search (imagenet/certify.py), on guided-diffusion's float64 schedule."""
    target, level, t = 2 * sigma, 0.0, 0
    while level < target:
        t += 1
        level = diffusion.sqrt_one_minus_alphas_cumprod[t] / diffusion.sqrt_alphas_cumprod[t]
    return t


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny original model, its .pt file, and the converted DDPMPipeline folder."""
    folder = tmp_path_factory.mktemp("guided_diffusion")
    model = original_model(TINY)
    checkpoint = save_original(model, folder / "tiny.pt")
    converted = convert_checkpoint(checkpoint, GuidedDiffusionConfig(**TINY), folder / "out")
    return model, checkpoint, converted


def inputs(seed: int = 1, batch: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator)
    t = torch.tensor([0, 37, 500, 999][:batch])
    return x, t


def assert_same_output(original: torch.nn.Module, unet: UNet2DModel, seed: int = 1) -> None:
    x, t = inputs(seed)
    with torch.no_grad():
        expected = original(x, t)
        got = unet(x, t).sample
    assert expected.shape == got.shape == (4, 6, 32, 32)
    assert expected.std() > 0.1  # the weights reach the output: not a comparison of zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the UNet


def test_converted_unet_computes_what_the_original_computes(tiny, monkeypatch, tmp_path):
    model, _, converted = tiny
    go_offline(monkeypatch, tmp_path / "hub")
    unet = UNet2DModel.from_pretrained(converted, subfolder="unet", use_safetensors=True)
    assert unet.dtype == torch.float32
    assert (converted / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (converted / "model_index.json").is_file()
    assert_same_output(model, unet)
    assert_same_output(model, unet, seed=2)


@pytest.mark.parametrize(
    "changes",
    [
        {"use_new_attention_order": True},
        {"resblock_updown": False, "use_scale_shift_norm": False},
        {"learn_sigma": False, "num_res_blocks": 1},
    ],
    ids=["new-attention-order", "conv-resample-additive-time", "fixed-sigma-one-block"],
)
def test_other_layouts_of_the_family_convert_exactly(changes):
    flags = dict(TINY, **changes)
    model = original_model(flags, seed=3)
    unet = convert_state_dict(model.state_dict(), GuidedDiffusionConfig(**flags))
    x, t = inputs()
    with torch.no_grad():
        expected, got = model(x, t), unet(x, t).sample
    assert got.shape[1] == (6 if flags["learn_sigma"] else 3)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_wrong_attention_order_is_detected_by_the_comparison(tiny):
    # Negative control: both qkv orders give tensors of the same shapes, so only the
    # numbers tell them apart; the tolerance above must be far below this difference.
    model, _, _ = tiny
    wrong = convert_state_dict(
        model.state_dict(), GuidedDiffusionConfig(**dict(TINY, use_new_attention_order=True))
    )
    x, t = inputs()
    with torch.no_grad():
        difference = (wrong(x, t).sample - model(x, t)).abs().max()
    assert difference > 1e-2


def test_preset_is_the_published_256x256_uncond_layout():
    # openai's README flags for 256x256_diffusion_uncond.pt (Carlini et al.'s Args), built
    # on the meta device: every key and shape of the full-size model, no memory.
    with torch.device("meta"):
        model = create_model(
            image_size=256, num_channels=256, num_res_blocks=2, learn_sigma=True,
            class_cond=False, attention_resolutions="32,16,8", num_head_channels=64,
            resblock_updown=True, use_scale_shift_norm=True, use_fp16=False,
        )
    state = model.state_dict()
    preset = PRESETS["imagenet256-uncond"]
    check_state_dict(state, preset)
    unet = convert_state_dict(state, preset)
    count = sum(p.numel() for p in unet.parameters())
    assert count == sum(t.numel() for t in state.values())
    assert unet.config.sample_size == 256 and unet.config.out_channels == 6
    with pytest.raises(GuidedDiffusionCheckpointError, match="shape mismatches"):
        check_state_dict(state, preset.replace(num_channels=128))


@pytest.mark.slow
def test_full_size_preset_computes_what_the_original_computes():
    # The 552,814,086-parameter 256x256 uncond architecture with random weights (the real
    # checkpoint cannot be had here), at a 64 x 64 input so that it runs on a CPU in
    # about half a minute: every level, down to 2 x 2, and every attention block is used.
    flags = {
        "image_size": 256, "num_channels": 256, "num_res_blocks": 2,
        "channel_mult": (1, 1, 2, 2, 4, 4), "attention_resolutions": (32, 16, 8),
        "num_head_channels": 64, "resblock_updown": True, "use_scale_shift_norm": True,
        "learn_sigma": True, "use_new_attention_order": False,
    }
    model = original_model(flags)
    unet = convert_state_dict(model.state_dict(), PRESETS["imagenet256-uncond"])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=generator)
    t = torch.tensor([145])
    with torch.no_grad():
        expected = model(x, t)
        del model
        got = unet(x, t).sample
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_scheduler_has_guided_diffusions_schedule(schedule, tmp_path):
    config = PRESETS["imagenet256-uncond"].replace(noise_schedule=schedule)
    DDPMScheduler(**config.scheduler_config()).save_pretrained(tmp_path)
    scheduler = DDPMScheduler.from_pretrained(tmp_path)
    expected = np.cumprod(1.0 - get_named_beta_schedule(schedule, 1000))
    got = scheduler.alphas_cumprod.double().numpy()
    # diffusers keeps the schedule in float32: agreement to float32 resolution.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert scheduler.config.variance_type == "learned_range"
    assert scheduler.config.prediction_type == "epsilon"


def test_converted_scheduler_gives_carlinis_timesteps(tiny):
    _, _, converted = tiny
    scheduler = DDPMScheduler.from_pretrained(converted, subfolder="scheduler")
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear")
    np.testing.assert_allclose(
        scheduler.alphas_cumprod.double().numpy(), diffusion.alphas_cumprod, rtol=0, atol=1e-6
    )
    for sigma in (0.12, 0.25, 0.5, 0.75, 1.0):
        denoiser = DDSDenoiser(UNet2DModel(**_small_unet()), scheduler, sigma)
        assert denoiser.timestep == carlini_timestep(diffusion, sigma), sigma


def _small_unet() -> dict:
    return {"sample_size": 8, "block_out_channels": (32,), "down_block_types": ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",), "layers_per_block": 1}


# ------------------------------------------------------------------ denoised smoothing


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_dds_gives_guided_diffusions_pred_xstart(tiny, sigma, monkeypatch, tmp_path):
    # Carlini et al.: x_t = sqrt(a_t) (2 x_noisy - 1), then p_mean_variance(...)["pred_xstart"]
    # with clip_denoised=True, mapped back to [0, 1].
    model, _, converted = tiny
    go_offline(monkeypatch, tmp_path / "hub")
    # What `certify --denoiser dds --denoiser-checkpoint FOLDER` builds (from_pretrained).
    denoiser = build_denoiser("dds", sigma=sigma, checkpoint=str(converted), device="cpu")
    assert isinstance(denoiser, DDSDenoiser) and denoiser.learned_variance
    diffusion = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="linear", timestep_respacing=""
    )
    t = carlini_timestep(diffusion, sigma)
    assert denoiser.timestep == t

    generator = torch.Generator().manual_seed(4)
    clean = torch.rand(3, 3, 32, 32, generator=generator)
    noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
    x_t = math.sqrt(diffusion.alphas_cumprod[t]) * (2 * noisy - 1)
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x_t, torch.full((3,), t), clip_denoised=True)
        expected = (out["pred_xstart"] + 1) / 2
        got = denoiser(noisy, sigma)
    inside = ((expected > 0.01) & (expected < 0.99)).float().mean()
    assert inside > 0.2  # most pixels are not simply clipped
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ bad checkpoints


def test_a_checkpoint_of_another_layout_is_refused_with_one_error(tiny, tmp_path):
    model, _, _ = tiny
    state = model.state_dict()
    with pytest.raises(GuidedDiffusionCheckpointError) as error:
        convert_state_dict(state, GuidedDiffusionConfig(**dict(TINY, num_res_blocks=1)))
    assert "unexpected keys" in str(error.value)
    with pytest.raises(GuidedDiffusionCheckpointError, match="shape mismatches"):
        convert_state_dict(state, GuidedDiffusionConfig(**dict(TINY, num_head_channels=32,
                                                               learn_sigma=False)))
    broken = dict(state)
    del broken["middle_block.1.qkv.weight"]
    broken["label_emb.weight"] = torch.zeros(1000, 128)
    with pytest.raises(GuidedDiffusionCheckpointError) as error:
        convert_state_dict(broken, GuidedDiffusionConfig(**TINY))
    message = str(error.value)
    assert "1 missing keys: middle_block.1.qkv.weight" in message
    assert "1 unexpected keys: label_emb.weight" in message


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_is_read_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    torch.save({"input_blocks.0.0.weight": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(GuidedDiffusionCheckpointError, match="weights_only=True"):
        convert_checkpoint(path, GuidedDiffusionConfig(**TINY), tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    path = tmp_path / "nested.pt"
    torch.save({"model": {"a": torch.zeros(1)}}, path)
    with pytest.raises(GuidedDiffusionCheckpointError, match="flat state dict"):
        convert_checkpoint(path, GuidedDiffusionConfig(**TINY), tmp_path / "out")


def test_impossible_hyperparameters_are_refused():
    with pytest.raises(GuidedDiffusionCheckpointError, match="feature-map size of no level"):
        GuidedDiffusionConfig(**dict(TINY, attention_resolutions=(12,)))
    with pytest.raises(GuidedDiffusionCheckpointError, match="divisible by 32"):
        GuidedDiffusionConfig(**dict(TINY, num_channels=48))
    with pytest.raises(GuidedDiffusionCheckpointError, match="must start with 1"):
        GuidedDiffusionConfig(**dict(TINY, channel_mult=(2, 2)))


# ------------------------------------------------------------------ the command


def test_command_converts_and_refuses_to_overwrite(tiny, tmp_path, monkeypatch):
    model, checkpoint, _ = tiny
    out = tmp_path / "adm"
    result = invoke(convert_command, str(checkpoint), str(out), *TINY_OPTIONS,
                    catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert "--denoiser dds --denoiser-checkpoint" in result.output
    go_offline(monkeypatch, tmp_path / "hub")
    assert_same_output(model, UNet2DModel.from_pretrained(out, subfolder="unet"))
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.config.variance_type == "learned_range"

    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    result = invoke(convert_command, str(checkpoint), str(out), *TINY_OPTIONS,
                    catch_exceptions=True)
    assert result.exit_code == 2
    assert "already exists" in result.output and "--overwrite" in result.output
    assert weights.stat().st_mtime_ns == before

    result = invoke(convert_command, str(checkpoint), str(out), *TINY_OPTIONS, "--overwrite",
                    catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert_same_output(model, UNet2DModel.from_pretrained(out, subfolder="unet"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing keys"),  # the 256x256 preset against the tiny checkpoint
        (["--channel-mult", "1,x"], "comma-separated integers"),
        (["--attention-resolutions", "5"], "feature-map size of no level"),
        (["--noise-schedule", "quadratic"], "Invalid value"),
    ],
)
def test_command_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, args, message):
    _, checkpoint, _ = tiny
    out = tmp_path / "adm"
    options = args if not args else [*TINY_OPTIONS, *args]
    result = invoke(convert_command, str(checkpoint), str(out), *options, catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_command_missing_checkpoint_exits_2(tmp_path):
    result = invoke(convert_command, str(tmp_path / "no.pt"), str(tmp_path / "o"),
                    catch_exceptions=True)
    assert result.exit_code == 2
    assert "no such checkpoint file" in result.output
    assert not (tmp_path / "o").exists()
