"""LGAP: language guided adversarial purification (Singh and Subramanyam, seed 001, Sec. 3).

For an input x in [0, 1] (Sec. 3.1-3.2):

    caption = BLIP(x)                                   (Sec. 3.1, image-grounded decoder)
    C       = tau(caption)                               (the LDM's text encoder)
    z_0     = E(x),  z_t = noised z_0 at strength t      (latent diffusion, Rombach et al.)
    z_0'    = the reverse process from z_t, conditioned on C
    x'      = D(z_0')                                    (the purified image)

and the classifier f is fine-tuned on purified clean images, argmin CE(f(x'), y) (Sec. 3.2,
"Final image reconstruction and training"; `adapt.lgap_finetune`). The paper names BLIP
and "a pre-trained latent diffusion model from [9] with default parameters except for the
noise parameter t", t = 0.5 for CIFAR-10/100 and 0.1 for ImageNet (Sec. 4.1). The caption
and diffusion step is diffusers' img2img: `strength` is that t.

What the paper leaves open, our choices (recorded in `settings`):
- captioner: `Salesforce/blip-image-captioning-base` (BLIP ViT-B, COCO captioning),
  unconditional captions decoded as BLIP's own demo does ("default hyperparameters"):
  beam search, 3 beams, max_length 20, min_length 5.
- LDM: `stable-diffusion-v1-5/stable-diffusion-v1-5` (the public Stable Diffusion v1.5, by
  the authors of [9]; the mirror of the withdrawn `runwayml/stable-diffusion-v1-5`), with
  diffusers' img2img defaults: its own scheduler (PNDM/PLMS), 50 inference steps (so
  int(50 t) denoising steps: 25 at t = 0.5, 5 at t = 0.1), guidance scale 7.5 against the
  empty prompt, eta 0.
- resolution: images are resized (bilinear, antialiased) to 512 x 512, Stable Diffusion's
  training size, purified there and resized back to their own size; a 32 x 32 CIFAR image
  would otherwise be a 4 x 4 latent. `resolution=None` purifies at the input's size (a
  multiple of the VAE's factor, 8). Grey images are purified as RGB (the channel repeated)
  and returned grey (the mean of the channels).

Gradients (`gradient`):
- "exact": autograd through the whole img2img pass: VAE encoder (including its sampled
  latent), every denoising step of the UNet with guidance and the scheduler's update, the
  decoder, the resizes. diffusers' pipeline `__call__` runs under `no_grad`, so
  `LGAPPurifier.img2img` runs the same steps with the pipeline's components (tested equal
  to the pipeline's output for the same generator). The caption is discrete (beam search
  over tokens): no gradient reaches x through it in any mode; for the attacker it is a
  constant of the current input. UNet steps are recomputed in the backward pass
  (`gradient_checkpointing`, memory only: same gradient).
- "official": the authors' code is not public ("We will be releasing the code soon",
  Sec. 4.1; none found), so official = exact.
- "bpda": the forward pass unchanged, the identity backward (the paper's BPDA, Table 3).
The purifier is random (latent sample and noise from `generator`): attack it with EOT.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from denoisers.purifiers.base import PurifiedClassifier, check_gradient
from denoisers.registry import (
    CheckpointError,
    dtype_kwargs,
    dtype_name,
    load_checkpoint,
    parse_dtype,
)

DEFAULT_CAPTION_CHECKPOINT = "Salesforce/blip-image-captioning-base"
DEFAULT_LDM_CHECKPOINT = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# BLIP's captioning demo (salesforce/BLIP): beam search, the paper's "default hyperparameters".
CAPTION_DECODING = {"num_beams": 3, "max_length": 20, "min_length": 5}
STRENGTH_CIFAR, STRENGTH_IMAGENET = 0.5, 0.1  # Sec. 4.1

Generators = torch.Generator | list[torch.Generator] | None


def load_captioner(
    checkpoint: str | Path = DEFAULT_CAPTION_CHECKPOINT,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
) -> tuple[nn.Module, Any]:
    """(BlipForConditionalGeneration, BlipProcessor) from a hub id or a save_pretrained
    folder, safetensors only, in eval mode on `device`."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    torch_dtype = parse_dtype(dtype)

    def load(path: str) -> tuple[nn.Module, Any]:
        processor = BlipProcessor.from_pretrained(path)
        model = BlipForConditionalGeneration.from_pretrained(
            path, use_safetensors=True, dtype=torch_dtype
        )
        return model, processor

    model, processor = load_checkpoint(load, checkpoint, what="BLIP captioning model")
    return model.to(device).eval().requires_grad_(False), processor


def load_ldm(
    checkpoint: str | Path = DEFAULT_LDM_CHECKPOINT,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    variant: str | None = None,
) -> Any:
    """A `StableDiffusionImg2ImgPipeline` (hub id or save_pretrained folder), safetensors
    only, without safety checker, frozen, on `device`."""
    from diffusers import StableDiffusionImg2ImgPipeline

    torch_dtype = parse_dtype(dtype)

    def load(path: str) -> Any:
        return StableDiffusionImg2ImgPipeline.from_pretrained(
            path,
            use_safetensors=True,
            variant=variant,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **dtype_kwargs(torch_dtype),
        )

    pipeline = load_checkpoint(load, checkpoint, what="latent diffusion model", variant=variant)
    pipeline.set_progress_bar_config(disable=True)
    for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        part.eval().requires_grad_(False)
    return pipeline.to(device)


class LGAPPurifier(nn.Module):
    """BLIP caption, then caption-guided img2img (see the module docstring).

    `purify(x, generator)` maps [B, C, H, W] in [0, 1] (C = 3, or 1 for grey) to the same
    shape in [0, 1]; the captions of the last call are kept in `last_captions`.
    """

    random = True

    def __init__(
        self,
        captioner: nn.Module,
        processor: Any,
        pipeline: Any,
        *,
        strength: float = STRENGTH_CIFAR,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        resolution: int | None = 512,
        caption_decoding: dict[str, Any] | None = None,
        gradient_checkpointing: bool = True,
    ):
        super().__init__()
        check_hyperparameters(strength, num_inference_steps, guidance_scale)
        self.captioner = captioner
        self.processor = processor
        self.pipeline = pipeline
        # Registered as submodules, so that `.to(device)` moves every model LGAP runs.
        self.unet, self.vae = pipeline.unet, pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.scale_factor = int(pipeline.vae_scale_factor)
        if resolution is not None and (
            isinstance(resolution, bool) or not isinstance(resolution, int)
            or resolution < self.scale_factor or resolution % self.scale_factor
        ):
            raise ValueError(
                f"resolution must be a positive multiple of the VAE's factor "
                f"{self.scale_factor}, or None, got {resolution!r}"
            )
        self.strength = float(strength)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.resolution = resolution
        self.caption_decoding = dict(CAPTION_DECODING if caption_decoding is None
                                     else caption_decoding)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.last_captions: list[str] = []

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # -- Sec. 3.1 -------------------------------------------------------------------------

    @torch.no_grad()
    def caption(self, x: torch.Tensor) -> list[str]:
        """BLIP's caption of each image of x [B, 3, H, W] in [0, 1] (no gradient: discrete)."""
        device = self.captioner.device
        inputs = self.processor(
            images=list(x.detach().float().cpu()), do_rescale=False,
            input_data_format="channels_first", return_tensors="pt",
        )
        pixel_values = inputs["pixel_values"].to(device=device, dtype=self.captioner.dtype)
        tokens = self.captioner.generate(pixel_values=pixel_values, **self.caption_decoding)
        return [text.strip() for text in self.processor.batch_decode(
            tokens, skip_special_tokens=True)]

    # -- Sec. 3.2 -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """C = tau(caption) per image, preceded by the empty prompt's embeddings when
        guidance is on ([2B, L, D], as the pipeline stacks them)."""
        positive, negative = self.pipeline.encode_prompt(
            captions, self.device, 1, self._guided
        )
        return torch.cat([negative, positive]) if self._guided else positive

    @property
    def _guided(self) -> bool:
        return self.guidance_scale > 1.0  # the pipeline's do_classifier_free_guidance

    def img2img(
        self, images: torch.Tensor, prompt_embeds: torch.Tensor, generator: Generators
    ) -> torch.Tensor:
        """The img2img pass of `StableDiffusionImg2ImgPipeline.__call__` (prompt given as
        embeddings, output_type "pt"), differentiable: images [B, 3, H, W] in [0, 1],
        H and W multiples of the VAE's factor, to [B, 3, H, W] in [0, 1]."""
        pipeline, scheduler = self.pipeline, self.pipeline.scheduler
        device, dtype = self.device, prompt_embeds.dtype
        batch = images.shape[0]
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        timesteps, _ = pipeline.get_timesteps(self.num_inference_steps, self.strength, device)
        # The pipeline's preprocessing of a [0, 1] tensor: 2 x - 1.
        latents = pipeline.prepare_latents(
            2.0 * images - 1.0, timesteps[:1].repeat(batch), batch, 1, dtype, device, generator
        )
        step_options = pipeline.prepare_extra_step_kwargs(generator, self.eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch)
            timestep_cond = pipeline.get_guidance_scale_embedding(
                scale, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if self._guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self._predict_noise(model_input, t, prompt_embeds, timestep_cond)
            if self._guided:
                uncond, text = noise.chunk(2)
                noise = uncond + self.guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, **step_options, return_dict=False)[0]
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (decoded / 2 + 0.5).clamp(0, 1)  # the postprocessor's denormalization

    def _predict_noise(
        self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
        timestep_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        def unet(sample: torch.Tensor) -> torch.Tensor:
            return self.unet(sample, t, encoder_hidden_states=embeds,
                             timestep_cond=timestep_cond, return_dict=False)[0]

        if self.gradient_checkpointing and torch.is_grad_enabled() and latents.requires_grad:
            # The UNet is deterministic: recomputing a step in the backward gives the same
            # graph, and only one step's activations are held at a time.
            return checkpoint(unet, latents, use_reentrant=False)
        return unet(latents)

    def purify(
        self, x: torch.Tensor, generator: Generators = None, captions: list[str] | None = None
    ) -> torch.Tensor:
        """x' = D(reverse(E(x) noised at t | tau(BLIP(x)))), shaped like x, in [0, 1].

        `generator`: one generator for the batch, or one per image (then image i depends
        on its own only); None draws from a fresh, randomly seeded one. `captions`
        replaces BLIP's (tests, fixed-caption experiments).
        """
        check_images(x)
        grey = x.shape[1] == 1
        rgb = x.expand(-1, 3, -1, -1) if grey else x
        size = tuple(rgb.shape[-2:])
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        if captions is None:
            captions = self.caption(rgb)
        elif len(captions) != x.shape[0]:
            raise ValueError(f"{len(captions)} captions for {x.shape[0]} images")
        self.last_captions = list(captions)
        embeds = self.encode_captions(list(captions))
        images = rgb.to(device=self.device, dtype=embeds.dtype)
        target = size if self.resolution is None else (self.resolution, self.resolution)
        if size != target:
            images = _resize(images, target)
        elif any(side % self.scale_factor for side in size):
            raise ValueError(
                f"images of {size[1]}x{size[0]} pixels with resolution=None: the VAE needs "
                f"sides that are multiples of {self.scale_factor}; give a resolution"
            )
        purified = self.img2img(images, embeds, generator)
        if size != target:
            # Interpolation weights are non-negative and sum to one: the result stays in
            # [0, 1] up to rounding, which the clamp removes.
            purified = _resize(purified, size).clamp(0, 1)
        purified = purified.to(device=x.device, dtype=x.dtype)
        return purified.mean(dim=1, keepdim=True) if grey else purified


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def check_hyperparameters(strength: float, num_inference_steps: int, guidance_scale: float) -> None:
    """Raise `ValueError` for img2img settings no run could use."""
    if not _is_number(strength) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength (the paper's t) must be in (0, 1], got {strength!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got "
                         f"{num_inference_steps!r}")
    if int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength {strength} x {num_inference_steps} steps leaves no denoising step "
            "(img2img runs int(strength * num_inference_steps)); raise either"
        )
    if not _is_number(guidance_scale) or not 0.0 <= guidance_scale < math.inf:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("LGAP purifies a float batch [B, C, H, W] in [0, 1]")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"LGAP purifies RGB (or grey) images, got {x.shape[1]} channels")


def load_purifier(
    *,
    caption_checkpoint: str | Path = DEFAULT_CAPTION_CHECKPOINT,
    ldm_checkpoint: str | Path = DEFAULT_LDM_CHECKPOINT,
    strength: float = STRENGTH_CIFAR,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    resolution: int | None = 512,
    num_beams: int = CAPTION_DECODING["num_beams"],
    max_length: int = CAPTION_DECODING["max_length"],
    min_length: int = CAPTION_DECODING["min_length"],
    gradient_checkpointing: bool = True,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    variant: str | None = None,
) -> tuple[LGAPPurifier, dict[str, Any]]:
    """The `LGAPPurifier` of `build` (same options) and its settings, without a classifier
    (for `adapt.lgap_finetune`, which purifies clean training images)."""
    check_hyperparameters(strength, num_inference_steps, guidance_scale)
    for name, value in (("num_beams", num_beams), ("max_length", max_length),
                        ("min_length", min_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if min_length > max_length:
        raise ValueError(f"min_length {min_length} exceeds max_length {max_length}")
    torch_dtype = parse_dtype(dtype)
    for name, value in (("caption_checkpoint", caption_checkpoint),
                        ("ldm_checkpoint", ldm_checkpoint)):
        if value is None or not str(value).strip():
            raise CheckpointError(f"LGAP needs {name} (a hub id or a save_pretrained folder)")
    captioner, processor = load_captioner(caption_checkpoint, device=device, dtype=torch_dtype)
    pipeline = load_ldm(ldm_checkpoint, device=device, dtype=torch_dtype, variant=variant)
    decoding = {"num_beams": num_beams, "max_length": max_length, "min_length": min_length}
    purifier = LGAPPurifier(
        captioner, processor, pipeline, strength=strength,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
        resolution=resolution, caption_decoding=decoding,
        gradient_checkpointing=gradient_checkpointing,
    )
    settings = {
        "purifier": "lgap",
        "caption_checkpoint": str(caption_checkpoint),
        "ldm_checkpoint": str(ldm_checkpoint),
        "scheduler": type(pipeline.scheduler).__name__,
        "strength": purifier.strength,
        "num_inference_steps": num_inference_steps,
        "denoising_steps": int(num_inference_steps * purifier.strength),
        "guidance_scale": purifier.guidance_scale,
        "eta": purifier.eta,
        "resolution": resolution,
        "caption_decoding": decoding,
        "dtype": dtype_name(torch_dtype),
        "variant": variant,
        "caption_gradient": "none (discrete)",
        "official_gradient": "exact (no public code)",
    }
    return purifier, settings


def build(
    *, classifier: nn.Module, gradient: str = "exact", **options: Any
) -> PurifiedClassifier:
    """LGAP in front of `classifier` (seed 001; see the module docstring).

    `options` are `load_purifier`'s keywords, with its defaults:
    strength: the paper's noise parameter t (Sec. 4.1): 0.5 for CIFAR-10/100 (default),
        0.1 for ImageNet.
    caption_checkpoint: BLIP captioner, hub id or folder (our choice of variant:
        Salesforce/blip-image-captioning-base). num_beams, max_length, min_length: its
        decoding (our choice: BLIP's demo, beam search 3 / 20 / 5).
    ldm_checkpoint: a Stable Diffusion img2img checkpoint, hub id or folder (our choice:
        stable-diffusion-v1-5/stable-diffusion-v1-5). num_inference_steps, guidance_scale,
        eta: diffusers' img2img defaults (our reading of "default parameters": 50, 7.5, 0).
    resolution: the size purified at (our choice: 512, Stable Diffusion's; None: the
        input's own size).
    gradient: "exact" (autograd through img2img; the caption is constant), "official"
        (= exact: the authors' code is not public), "bpda" (identity backward).
    gradient_checkpointing: recompute UNet steps in the backward (memory only).
    device, dtype, variant: where and in which precision the two models run; variant
        picks weight files (e.g. "fp16").
    The classifier is the one fine-tuned on purified images (`adapt.lgap_finetune`), or
    any base classifier on [0, 1] images.
    """
    check_gradient(gradient)
    if not isinstance(classifier, nn.Module):
        raise ValueError(
            f"LGAP wraps a torch.nn.Module classifier of [B, C, H, W] images in [0, 1], "
            f"got {type(classifier).__name__}"
        )
    unknown = sorted(set(options) - set(inspect.signature(load_purifier).parameters))
    if unknown:
        raise ValueError(f"LGAP has no option {', '.join(unknown)}")
    purifier, settings = load_purifier(**options)
    return PurifiedClassifier(purifier, classifier, gradient=gradient, settings=settings)
