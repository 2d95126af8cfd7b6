"""DeepFloyd IF-II as a one-shot denoiser with timestep correction (Choi et al. 2024, Eq. 9).

IF-II is a text-conditional super-resolution model eps(x_t, t, text | x_low_t', t'): its
UNet takes the noisy image and the upscaled, re-noised low-resolution image stacked on
the channel axis (6 channels), the text embedding, and the low-resolution noise level
t' as `class_labels`; it predicts noise and a learned variance (6 channels).

As a denoiser for sigma (in [0, 1] space): x_hat = 2 x - 1 carries noise 2 * sigma;
t_hat is the first timestep whose noise level reaches 2 * sigma (Eq. 6); both image
inputs are x_t = sqrt(a_t_hat) * x_hat (Eq. 9's "self-conditioning"); the condition's
level is t' = k * t_hat (Eq. 8, k = 1.8 by default, the paper's choice), rounded down and
clamped to the last timestep (`timestep_rounding="floor"`), or, as the reference code
does, the float k * t_hat clamped at T (`"reference"`; see `corrected_timestep`); the
output is x_hat - s * eps (noise channels only), with
s = sqrt((1 - a_t_hat) / a_t_hat) the schedule's noise level at t_hat. Eq. 9 writes s as
the input noise level; the paper's code takes the scheduler's `pred_original_sample`,
which uses the schedule's value at t_hat (>= 2 sigma by less than one step of the grid),
and so does this module. The estimate is clipped to [-1, 1] and mapped back to [0, 1]
(the reference's scheduler step applies the scheduler's dynamic thresholding instead,
which is this same clip when its sample_max_value is 1).

Prompt: Eq. 9 conditions on a template C(c) with an empty label. `prompt` is the text,
and a "{}" in it is replaced by `token` (default ""): "" (the reference code's default),
"This is a photo of a {}." with token "sks" after personalization (`adapt`), etc. The
embedding is computed once with the pipeline's `encode_prompt`, without classifier-free
guidance (the reference runs with guidance off); the T5 encoder is then released.

Training (`adapt`): `load_if2` loads the UNet, scheduler and the once-computed prompt
embedding the same way for personalization and classifier fine-tuning, and
`denoise_at_timesteps` is Eq. 9 with a timestep drawn per image (Algorithm 2), sharing
`predict_noise` (the UNet call) with the denoiser.

Resolution: images are denoised at their own size, as the reference code feeds 224 x 224
crops straight to IF-II (trained at 256 x 256; the UNet is convolutional). A size that
is not a multiple of the UNet's downsampling factor, which IF-II's up blocks cannot
take, is reflect-padded and cropped back: resampling would filter the noise and break
the match of Eq. 6.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import DDPMScheduler, IFSuperResolutionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from transformers import T5Tokenizer

from denoisers.dds import variant_weight_files
from denoisers.pipeline import Denoiser, pad_to_multiple
from denoisers.registry import (
    dtype_kwargs,
    dtype_name,
    load_checkpoint,
    load_tokenizer,
    parse_dtype,
)
from denoisers.timesteps import (
    TIMESTEP_ROUNDINGS,
    corrected_timestep,
    noise_levels,
    timestep_for_sigma,
)

DEFAULT_CHECKPOINT = "DeepFloyd/IF-II-L-v1.0"
_HOW_TO_GET_IF = (
    "accept the DeepFloyd IF license on https://huggingface.co/{name}, log in with "
    "`hf auth login` and run `hf download {name}` (older clients: `huggingface-cli login` "
    "and `huggingface-cli download {name}`)"
)


def format_prompt(prompt: str, token: str = "") -> str:
    """The conditioning text: `prompt` with "{}" replaced by `token`."""
    if "{}" in prompt:
        return prompt.replace("{}", token)
    if token:
        raise ValueError(f"token {token!r} given but prompt {prompt!r} has no {{}} placeholder")
    return prompt


class IF2Parts(NamedTuple):
    """What the denoiser (and `adapt`'s training) needs of an IF-II pipeline."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    prompt_embeds: torch.Tensor  # [1, L, D], in the UNet's dtype, on the target device
    info: dict[str, Any]


def load_if2(
    checkpoint: str | Path = DEFAULT_CHECKPOINT,
    *,
    prompt: str = "",
    token: str = "",
    lora: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    variant: str | None = None,
) -> IF2Parts:
    """Load an IFSuperResolutionPipeline (hub id or save_pretrained directory), optionally
    with LoRA weights, embed the prompt once and release the text encoder.

    `variant="fp16"` reads DeepFloyd's `*.fp16.safetensors` files (upcast to `dtype`); the
    tokenizer may be the hub's slow one (`tokenizer/spiece.model`). Files that are
    missing or unreadable raise a `CheckpointError` saying which and what to do.

    The UNet is returned on the CPU (callers move it); the prompt embedding is on `device`.
    """
    torch_dtype = parse_dtype(dtype)
    text = format_prompt(prompt, token)
    device = torch.device(device)

    def load(path: str) -> IFSuperResolutionPipeline:
        tokenizer = load_tokenizer(T5Tokenizer, path, what="IF-II model")
        return IFSuperResolutionPipeline.from_pretrained(
            path,
            tokenizer=tokenizer,
            use_safetensors=True,
            **dtype_kwargs(torch_dtype),
            variant=variant,
            # Only the UNet, schedulers and text encoder are needed.
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            requires_safety_checker=False,
        )

    name = str(checkpoint)
    pipeline = load_checkpoint(
        load,
        checkpoint,
        what="IF-II model",
        how_to_get=_HOW_TO_GET_IF.format(name=name),
        variant=variant,
    )
    if pipeline.unet.dtype != torch_dtype:
        raise RuntimeError(f"asked for a {torch_dtype} UNet, got {pipeline.unet.dtype}")
    if pipeline.text_encoder is None or pipeline.tokenizer is None:
        raise ValueError(f"{name} has no text encoder/tokenizer to embed the prompt with")
    if lora is not None:
        load_checkpoint(pipeline.load_lora_weights, lora, what="LoRA weights")

    # Embed once, on the target device, then drop T5 (the largest part of IF-II)
    # before the UNet moves there, so the two never share the device's memory.
    pipeline.text_encoder.to(device)
    with torch.no_grad():
        prompt_embeds, _ = pipeline.encode_prompt(
            text, do_classifier_free_guidance=False, device=device
        )
    unet, scheduler = pipeline.unet, pipeline.scheduler
    del pipeline
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    info = {
        "checkpoint": name,
        "prompt_template": prompt,
        "token": token,
        "prompt": text,
        "lora": None if lora is None else str(lora),
        "variant": variant,
    }
    return IF2Parts(unet, scheduler, prompt_embeds, info)


def predict_noise(
    unet: UNet2DConditionModel,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    prompt_embeds: torch.Tensor,
) -> torch.Tensor:
    """IF-II's noise estimate for states x_t that are their own low-resolution condition.

    The UNet sees [x_t, x_t] on the channel axis (Eq. 9's self-conditioning), the
    timesteps, the one prompt embedding [1, L, D] (expanded, not copied) and the
    condition's noise levels t' as `class_labels`. Returns the noise channels only (IF-II
    also predicts a variance), in the UNet's output dtype.
    """
    batch, channels = x_t.shape[:2]
    out = unet(
        torch.cat([x_t, x_t], dim=1),  # x_t and the condition are the same image
        timesteps,
        encoder_hidden_states=prompt_embeds.expand(batch, -1, -1),
        class_labels=class_labels,
        return_dict=False,
    )[0]
    return out[:, :channels]  # the rest is the learned variance


def corrected_timesteps(
    timesteps: torch.Tensor, k: float, num_train_timesteps: int, rounding: str = "floor"
) -> torch.Tensor:
    """Eq. 8 for each timestep of a batch (`corrected_timestep`): long for "floor", float32
    for "reference" (the UNet embeds the float level as it is)."""
    values = [
        corrected_timestep(int(t), k, num_train_timesteps, rounding) for t in timesteps.tolist()
    ]
    return torch.tensor(values, dtype=_label_dtype(rounding), device=timesteps.device)


def _label_dtype(rounding: str) -> torch.dtype:
    return torch.long if rounding == "floor" else torch.float32


def denoise_at_timesteps(
    unet: UNet2DConditionModel,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    k: float = 1.8,
    timestep_rounding: str = "floor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9 at a timestep per image, differentiable: (noise estimate, denoised image).

    `x_t` [B, C, H, W] are diffusion states sqrt(a_t) x + sqrt(1 - a_t) eps of images x
    in [-1, 1] (Eq. 5), `timesteps` [B] their t. The condition is x_t itself at level
    t' = k t (Eq. 8, rounded as `timestep_rounding` says, as `IF2Denoiser`); the
    estimate is x_t / sqrt(a_t) - sqrt((1 - a_t) / a_t) * eps_hat (Eq. 9 with the noise
    level of t), clipped to [-1, 1] and mapped to [0, 1]. This is `IF2Denoiser` for a
    timestep drawn per image, as `adapt`'s training needs it (Algorithm 2, lines 10-12).
    Returns eps_hat [B, C, H, W] (noise channels) and the estimate, both float32.
    """
    if x_t.dim() != 4 or timesteps.shape != x_t.shape[:1]:
        raise ValueError(
            f"expected x_t [B, C, H, W] and timesteps [B], got {tuple(x_t.shape)} and "
            f"{tuple(timesteps.shape)}"
        )
    alphas = torch.as_tensor(alphas_cumprod).to(device=x_t.device, dtype=torch.float32)
    labels = corrected_timesteps(timesteps, k, alphas.numel(), timestep_rounding)
    padded, crop = pad_to_multiple(x_t, 2 ** (len(unet.config.down_block_types) - 1))
    eps = predict_noise(unet, padded.to(unet.dtype), timesteps, labels, prompt_embeds)
    eps = crop(eps.float())
    a = alphas[timesteps].view(-1, 1, 1, 1)
    x0 = x_t.float() / a.sqrt() - ((1.0 - a) / a).sqrt() * eps
    return eps, ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)


class IF2Denoiser(Denoiser):
    """Eq. 9 of Choi et al. (2024) on an IF-II UNet, for one noise level."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        prompt_embeds: torch.Tensor,
        sigma: float,
        *,
        k: float = 1.8,
        timestep_rounding: str = "floor",
        info: dict[str, Any] | None = None,
    ):
        super().__init__(sigma)
        if timestep_rounding not in TIMESTEP_ROUNDINGS:
            raise ValueError(
                f"unknown timestep rounding {timestep_rounding!r}; use "
                f"{' or '.join(TIMESTEP_ROUNDINGS)}"
            )
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(
                f"expected one prompt embedding [1, L, D], got {tuple(prompt_embeds.shape)}"
            )
        if unet.config.in_channels % 2:
            raise ValueError("an IF-II UNet takes the image and its condition: even in_channels")
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.channels = int(unet.config.in_channels) // 2
        # Each down block but the last halves the resolution.
        self.size_multiple = 2 ** (len(unet.config.down_block_types) - 1)
        self.k = float(k)
        self.timestep_rounding = timestep_rounding
        self.info = dict(info or {})
        # The files the networks were read from, for provenance hashes; None when unknown
        # (built in memory, or a hub id resolved by diffusers' cache).
        self.weight_files: list[Path] | None = None
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

        alphas_cumprod = scheduler.alphas_cumprod
        self.timestep = timestep_for_sigma(alphas_cumprod, 2 * self.sigma)
        self.corrected_timestep = corrected_timestep(
            self.timestep, self.k, self.num_train_timesteps, timestep_rounding
        )
        alpha = float(torch.as_tensor(alphas_cumprod, dtype=torch.float64)[self.timestep])
        self.sqrt_alpha = math.sqrt(alpha)
        self.schedule_noise_level = float(noise_levels(alphas_cumprod)[self.timestep])

        # One copy of each per-run constant; every batch gets an expanded view.
        self.register_buffer("_timestep", torch.tensor([self.timestep]), persistent=False)
        # "reference" keeps the float level (e.g. 520.2): a float32 label, which the UNet's
        # sinusoidal class embedding takes as it is.
        self.register_buffer(
            "_class_label",
            torch.tensor([self.corrected_timestep], dtype=_label_dtype(timestep_rounding)),
            persistent=False,
        )
        self.register_buffer(
            "prompt_embeds", prompt_embeds.detach().to(unet.dtype), persistent=False
        )

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path = DEFAULT_CHECKPOINT,
        *,
        sigma: float,
        k: float = 1.8,
        timestep_rounding: str = "floor",
        prompt: str = "",
        token: str = "",
        lora: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        variant: str | None = None,
    ) -> IF2Denoiser:
        """Load an IFSuperResolutionPipeline (hub id or save_pretrained directory)."""
        unet, scheduler, prompt_embeds, info = load_if2(
            checkpoint,
            prompt=prompt,
            token=token,
            lora=lora,
            device=device,
            dtype=dtype,
            variant=variant,
        )
        denoiser = cls(
            unet, scheduler, prompt_embeds, sigma, k=k, timestep_rounding=timestep_rounding,
            info=info,
        )
        folder = Path(checkpoint).expanduser()
        if folder.is_dir():  # a hub id resolved by diffusers' cache names no files here
            denoiser.weight_files = _local_files(folder, variant, lora)
        return denoiser.to(device)

    def at(
        self, sigma: float, k: float | None = None, timestep_rounding: str | None = None
    ) -> IF2Denoiser:
        """The same network and prompt for another noise level, correction factor or
        rounding of the corrected timestep."""
        denoiser = IF2Denoiser(
            self.unet, self.scheduler, self.prompt_embeds, sigma,
            k=self.k if k is None else k,
            timestep_rounding=timestep_rounding or self.timestep_rounding,
            info=self.info,
        )
        denoiser.weight_files = self.weight_files
        return denoiser

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        batch, channels = noisy.shape[:2]
        if channels != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {channels}")
        x_hat = 2.0 * noisy.float() - 1.0  # [-1, 1] space: the noise is now 2 * sigma
        x_hat, crop = pad_to_multiple(x_hat, self.size_multiple)
        x_t = (self.sqrt_alpha * x_hat).to(self.unet.dtype)
        eps = predict_noise(
            self.unet,
            x_t,
            self._timestep.expand(batch),
            self._class_label.expand(batch),
            self.prompt_embeds,
        ).float()
        x0 = crop(x_hat - self.schedule_noise_level * eps)
        return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)

    def settings(self) -> dict[str, Any]:
        return {
            "denoiser": "if2",
            "checkpoint": self.info.get("checkpoint"),
            "sigma": self.sigma,
            "model_noise_level": 2 * self.sigma,
            "timestep": self.timestep,
            "k": self.k,
            "timestep_rounding": self.timestep_rounding,
            "corrected_timestep": self.corrected_timestep,
            "num_train_timesteps": self.num_train_timesteps,
            "schedule_noise_level": self.schedule_noise_level,
            "input_scale": self.sqrt_alpha,
            "prompt_template": self.info.get("prompt_template"),
            "token": self.info.get("token"),
            "prompt": self.info.get("prompt"),
            "lora": self.info.get("lora"),
            "variant": self.info.get("variant"),
            "resolution": "native",
            "dtype": dtype_name(self.unet.dtype),
        }


def _local_files(folder: Path, variant: str | None, lora: str | Path | None) -> list[Path]:
    """The files of a local IF-II folder that decide the denoiser's numbers: the UNet's and
    T5 encoder's configs and weights of `variant`, the scheduler's config, the tokenizer's
    files, and the LoRA weights (a file, or the default file of a LoRA folder)."""
    files = [folder / "scheduler" / "scheduler_config.json"]
    for component, prefix in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        index = f"{prefix}.safetensors.index{'.' + variant if variant else ''}.json"
        files += [folder / component / "config.json", folder / component / index]
        files += variant_weight_files(folder / component, prefix, variant)
    tokenizer = folder / "tokenizer"
    files += sorted(tokenizer.iterdir()) if tokenizer.is_dir() else []
    if lora is not None:
        lora = Path(lora).expanduser()
        files.append(lora / LORA_WEIGHT_NAME_SAFE if lora.is_dir() else lora)
    return [path for path in files if path.is_file()]
