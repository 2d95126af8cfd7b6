"""CLIPure (seed 000): purification of a CLIP zero-shot classifier's image embedding.

The image embedding z = r u (magnitude r, direction u) of a `CLIPZeroShotClassifier` is
moved along the normalized gradient of a log-likelihood before the zero-shot head reads
it (Alg. 1 with Eq. 9):

    g   = r * grad_z log p(z)                    (Eq. 9: the gradient w.r.t. u)
    u  <- u + step_size * g / ||g||,   u <- u / ||u||,   z <- r u

`steps` times (10, step size 30: App. C.3). Two likelihoods:

- CLIPure-Cos (Eq. 8): log p(z) ~ cos(z, t), t the text embedding of the blank prompt
  "a photo of a ." averaged over CLIP's 80 templates with an empty class name (App. C.3;
  `CLIP_eval/CLIPure_Cos.py` of the official code averages the unit embeddings of
  `template.format(c="")`). It runs on the unit embedding, as the official code does.
- CLIPure-Diff (Eq. 7): log p(z) ~ -||f(z_t, t, text) - target||^2 at one t ~ U{900..999}
  per step, f a diffusion prior over CLIP image embeddings conditioned on the blank
  prompt. The paper uses DALL-E 2's DiffusionPrior (dalle2_pytorch), which diffusers
  does not have; this is a STAND-IN with diffusers' `PriorTransformer` + `UnCLIPScheduler`
  of a public CLIP ViT-L/14 prior (`kakaobrain/karlo-v1-alpha`,
  `kandinsky-community/kandinsky-2-1-prior`). Those priors model the raw (not unit)
  image embedding standardized with their `clip_mean`/`clip_std`, so Diff purifies the
  raw embedding, mapped into that space for the prior; both predict x0 ("sample"), whose
  loss is the official code's `p_losses` (DALL-E 2's prior predicts x0 too).

Normalization of the step (`normalization`): "sample" divides each example's g by its
own norm (Alg. 1, one example at a time); "batch" divides the whole batch's g by one
Frobenius norm, as the official code does (`torch.norm(grad_u, p=2)`): each example's
step is then step_size * ||g_b|| / sqrt(sum_j ||g_j||^2), so its output depends on the
other examples in its batch (on how AutoAttack batches them).

What the paper's step does (CLIPure-Cos, "sample"): grad_u cos(u, t) is the component of
t orthogonal to u, so each step stays in the plane of (u, t) and, u being a unit vector
and the step a vector of length s orthogonal to it, turns u toward t by exactly
atan(s). At s = 30 that is 88.09 degrees: an embedding at angle phi in (0, 88.09) from t
(cos(u, t) > 1/sqrt(901) = 0.033, every natural image) is carried past t to 88.09 - phi
on the other side, and the next step brings it back to phi. After an even number of
steps (the paper's 10) the purified embedding IS the input embedding (up to rounding),
so CLIPure-Cos with the paper's settings and per-example normalization is the identity
and its exact gradient is the undefended classifier's. See docs/purifiers/clipure.md.

Gradient modes (see `base`):

- "exact": the inner gradient is built with `create_graph=True` (second order through
  grad cos or through the prior), so the attacker differentiates the whole map.
- "official": the inner gradient is detached (the official code calls
  `torch.autograd.grad` without `create_graph`), the magnitude r and the
  normalizations stay in the graph. One step from a unit u then has the Jacobian
  u' u^T + (I - u' u'^T)(I - u u^T) / sqrt(1 + s^2): every direction orthogonal to the
  (u, t) plane is scaled by 1 / sqrt(1 + s^2) per step, (1/901)^5 = 1.7e-15 after 10
  steps at s = 30: the attacker's gradient all but vanishes (and underflows in fp16,
  where the official code runs CLIP).
- "bpda": the purification's backward is the identity on the embedding.

`build_feature_cos` runs the same loop on the digits CNN's penultimate feature (an
analogue for the digits-scale check, not a method of the paper); there the feature's
norm reaches the linear last layer, so the official gradient keeps the part through r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from denoisers.purifiers.base import check_gradient
from smoothing.attacks import BPDA
from smoothing.core import _generator_for

NORMALIZATIONS: tuple[str, ...] = ("sample", "batch")
# The public priors diffusers can load, and the CLIP their embeddings come from.
KNOWN_PRIORS: dict[str, str] = {
    "kakaobrain/karlo-v1-alpha": "ViT-L-14",
    "kandinsky-community/kandinsky-2-1-prior": "ViT-L-14",
}
DEFAULT_PRIOR = "kakaobrain/karlo-v1-alpha"
# Karlo keeps the prior's scheduler in prior_scheduler/, Kandinsky 2.1's prior in scheduler/.
PRIOR_SCHEDULER_CONFIGS = (
    "prior_scheduler/scheduler_config.json",
    "scheduler/scheduler_config.json",
)


# The paper's loop (App. C.3; `iter`/`step_size` of CLIPure_Cos.py) and our reading of
# Alg. 1's normalization, shared by every builder below.
STEPS, STEP_SIZE, NORMALIZATION = 10, 30.0, "sample"


class PriorMismatchError(ValueError):
    """A prior trained on the embeddings of another CLIP than the classifier's."""


def _check_clip(classifier: Any, name: str) -> None:
    from classifiers.clip import CLIPZeroShotClassifier

    if not isinstance(classifier, CLIPZeroShotClassifier):
        raise ValueError(
            f"{name} purifies the image embedding of a CLIP zero-shot classifier (clip-b32, "
            f"clip-b16, clip-l14); it cannot wrap {type(classifier).__name__}"
        )


def _check_steps(steps: int, step_size: float, normalization: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}"
        )


def blank_prompts(templates: Sequence[str]) -> list[str]:
    """The templates with an empty class name: "a photo of a {}." -> "a photo of a ."."""
    return [str(t).replace("{c}", "{}").replace("{}", "") for t in templates]


@torch.no_grad()
def blank_text_embedding(classifier: Any, templates: Sequence[str] | None = None) -> torch.Tensor:
    """t of Eq. 8: the unit mean of the unit text embeddings of the blank prompts [D].

    `templates` default to CLIP's 80 ImageNet templates (App. C.3).
    """
    if templates is None:
        from classifiers.datasets import default_templates

        templates = default_templates()
    prompts = blank_prompts(templates)
    if not prompts:
        raise ValueError("CLIPure needs at least one blank-prompt template")
    device = classifier.model.logit_scale.device
    tokens = classifier.tokenizer(prompts).to(device)
    embeddings = F.normalize(classifier.model.encode_text(tokens).float(), dim=-1)
    return F.normalize(embeddings.mean(dim=0), dim=-1)


class CosineLikelihood(nn.Module):
    """log p(z) ~ cos(z, t) (Eq. 8), on the unit embedding."""

    random = False
    unit_embeddings = True

    def __init__(self, blank_embedding: torch.Tensor):
        super().__init__()
        self.register_buffer("blank", F.normalize(blank_embedding.detach(), dim=-1))

    def forward(self, embeddings: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        del generator
        return F.cosine_similarity(embeddings, self.blank.to(embeddings.dtype)[None], dim=-1)


class PriorLikelihood(nn.Module):
    """log p(z) ~ -||f(z_t, t, c) - target||^2 (Eq. 7) with a diffusers `PriorTransformer`.

    z is the raw CLIP image embedding; x0 = (z - clip_mean) / clip_std is the prior's
    standardized space; z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with t ~ U{t_min..t_max}
    and eps ~ N(0, I) drawn per example from the generator (our choice: the official code
    draws one t per batch from Python's `random`); target is x0 for priors that predict
    the sample (Karlo, Kandinsky: the loss of the official `p_losses`) and eps for
    epsilon-prediction ones. The mean over the embedding dimension is taken.
    `condition` holds the blank prompt's `proj_embedding` [1, D], `encoder_hidden_states`
    [1, L, D] and `attention_mask` [1, L].
    """

    random = True
    unit_embeddings = False

    def __init__(
        self,
        prior: nn.Module,
        scheduler: Any,
        condition: dict[str, torch.Tensor],
        timesteps: tuple[int, int] = (900, 999),
    ):
        super().__init__()
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("sample", "epsilon"):
            raise ValueError(f"unsupported prior prediction_type {prediction_type!r}")
        t_min, t_max = (int(t) for t in timesteps)
        total = int(scheduler.config.num_train_timesteps)
        if not 0 <= t_min <= t_max < total:
            raise ValueError(
                f"timesteps must satisfy 0 <= t_min <= t_max < {total}, got {timesteps}"
            )
        self.prior = prior.eval().requires_grad_(False)
        self.prediction_type = prediction_type
        self.timesteps = (t_min, t_max)
        alphas = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", alphas.float(), persistent=False)
        self.register_buffer("proj_embedding", condition["proj_embedding"], persistent=False)
        self.register_buffer("hidden_states", condition["encoder_hidden_states"], persistent=False)
        self.register_buffer("attention_mask", condition["attention_mask"], persistent=False)

    def forward(self, embeddings: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch = embeddings.shape[0]
        generator = _generator_for(embeddings, generator)
        t = torch.randint(
            self.timesteps[0], self.timesteps[1] + 1, (batch,), generator=generator,
            device=embeddings.device,
        )
        noise = torch.randn(
            embeddings.shape, generator=generator, device=embeddings.device,
            dtype=embeddings.dtype,
        )
        dtype = self.prior.dtype
        mean = self.prior.clip_mean.to(embeddings.dtype)
        std = self.prior.clip_std.to(embeddings.dtype)
        x0 = (embeddings - mean) / std
        alpha = self.alphas_cumprod.to(embeddings.dtype)[t][:, None]
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        predicted = self.prior(
            noisy.to(dtype),
            timestep=t,
            proj_embedding=self.proj_embedding.to(dtype).expand(batch, -1),
            encoder_hidden_states=self.hidden_states.to(dtype).expand(batch, -1, -1),
            attention_mask=self.attention_mask.expand(batch, -1),
        ).predicted_image_embedding.to(embeddings.dtype)
        target = x0 if self.prediction_type == "sample" else noise
        return -(predicted - target).square().mean(dim=-1)


class CLIPurePurifiedClassifier(nn.Module):
    """A CLIP zero-shot classifier whose image embedding is purified (Alg. 1).

    A purified model (see `base`): [B, 3, H, W] in [0, 1] -> logits [B, K], with
    `classifier`, `gradient`, `random`, `generator`, `settings`.
    `purify_embeddings(z)` is the latent map alone ([B, D] -> [B, D], same norms).
    """

    def __init__(
        self,
        classifier: nn.Module,
        likelihood: nn.Module,
        *,
        gradient: str,
        steps: int,
        step_size: float,
        normalization: str,
        settings: dict[str, Any],
    ):
        super().__init__()
        self.classifier = classifier
        self.likelihood = likelihood
        self.gradient = check_gradient(gradient)
        self.steps = steps
        self.step_size = float(step_size)
        self.normalization = normalization
        self.random = bool(likelihood.random)
        self.generator: torch.Generator | None = None
        self.settings = {**settings, "gradient": self.gradient}

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The embeddings the likelihood reads: unit ones for Cos, raw ones for Diff."""
        raw = self.classifier.model.encode_image(self.classifier.preprocess(images))
        return F.normalize(raw, dim=-1) if self.likelihood.unit_embeddings else raw

    def _ascent(self, embeddings: torch.Tensor) -> torch.Tensor:
        """grad_z log p(z) [B, D]: with its graph in "exact" mode, detached otherwise."""
        with torch.enable_grad():
            if self.gradient == "exact" and embeddings.requires_grad:
                source, create_graph = embeddings, True
            else:
                source, create_graph = embeddings.detach().requires_grad_(True), False
            objective = self.likelihood(source, self.generator)
            (grad,) = torch.autograd.grad(objective.sum(), source, create_graph=create_graph)
        return grad

    def purify_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        z = embeddings
        for _ in range(self.steps):
            r = z.norm(dim=-1, keepdim=True)
            u = z / r
            grad_u = r * self._ascent(z)  # Eq. 9
            if self.normalization == "sample":
                norm = grad_u.norm(dim=-1, keepdim=True)
            else:  # the official code: one norm over the whole batch
                norm = grad_u.norm()
            # An embedding where the gradient vanishes (z = t) stays where it is.
            u = u + self.step_size * grad_u / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            z = r * F.normalize(u, dim=-1)
        return z

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.image_embeddings(images)
        if self.gradient == "bpda":
            purified = BPDA(_PurifyEmbeddings(self))(z)
        else:
            purified = self.purify_embeddings(z)
        return self.head(purified)

    def head(self, embeddings: torch.Tensor) -> torch.Tensor:
        """CLIP's zero-shot head on (purified) embeddings: scaled cosines with the classes."""
        weights = self.classifier.class_embeddings.to(embeddings.dtype)
        scale = self.classifier.model.logit_scale.exp()
        return scale * F.normalize(embeddings, dim=-1) @ weights.t()


class FeatureCLIPureClassifier(CLIPurePurifiedClassifier):
    """The digits analogue (not the paper's method): CLIPure-Cos's loop on the penultimate
    feature of the digits CNN, toward a class-agnostic direction; see `build_feature_cos`.
    The feature keeps its norm (the CNN's head is linear, not a cosine) and the CNN's
    last layer reads the purified feature."""

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        cnn = self.classifier
        return cnn.head[:-1](cnn.features((images - cnn.MEAN) / cnn.STD))

    def head(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier.head[-1](embeddings)


class _PurifyEmbeddings(nn.Module):
    """The latent map of a `CLIPurePurifiedClassifier` as a module (for `BPDA`)."""

    def __init__(self, purified: CLIPurePurifiedClassifier):
        super().__init__()
        self._purified = [purified]  # a list: not registered as a submodule twice

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._purified[0].purify_embeddings(z)


def _move(model: CLIPurePurifiedClassifier, device: str | torch.device | None):
    return model if device is None else model.to(device)


def build_cos(
    *,
    classifier: nn.Module,
    gradient: str = "exact",
    steps: int = STEPS,
    step_size: float = STEP_SIZE,
    normalization: str = NORMALIZATION,
    blank_templates: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> CLIPurePurifiedClassifier:
    """CLIPure-Cos around a `CLIPZeroShotClassifier` (seed 000, Eq. 8-9, Alg. 1).

    Args:
        steps, step_size: 10 and 30 (App. C.3; `iter`/`step_size` of CLIPure_Cos.py).
        normalization: "sample" (Alg. 1, each example's step has length step_size; our
            reading of the paper) or "batch" (the official code: one norm over the batch).
        blank_templates: templates whose class name is left empty for t (default: CLIP's
            80 ImageNet templates, App. C.3).
        gradient: "exact", "official" (detached inner gradient, as the official code) or
            "bpda" (see the module docstring for what each gives an attacker).
    """
    check_gradient(gradient)
    _check_clip(classifier, "clipure-cos")
    _check_steps(steps, step_size, normalization)
    blank = blank_text_embedding(classifier, blank_templates)
    settings = {
        "purifier": "clipure-cos",
        "steps": steps,
        "step_size": float(step_size),
        "normalization": normalization,
        "blank_templates": "clip-imagenet-80" if blank_templates is None else list(blank_templates),
    }
    model = CLIPurePurifiedClassifier(
        classifier, CosineLikelihood(blank), gradient=gradient, steps=steps,
        step_size=step_size, normalization=normalization, settings=settings,
    )
    return _move(model, device)


def load_prior(
    checkpoint: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any, nn.Module, Any]:
    """(PriorTransformer, UnCLIPScheduler, CLIPTextModelWithProjection, CLIPTokenizer) of a
    prior repository (Karlo's `prior/`, `prior_scheduler/`, `text_encoder/`, `tokenizer/`;
    Kandinsky 2.1 prior's `scheduler/`), a hub id or a local directory, safetensors only."""
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from denoisers.registry import dtype_kwargs, load_checkpoint, locate

    def load(path: str):
        scheduler_folder = locate(path, PRIOR_SCHEDULER_CONFIGS).split("/")[0]
        prior = PriorTransformer.from_pretrained(
            path, subfolder="prior", use_safetensors=True, **dtype_kwargs(dtype)
        )
        scheduler = UnCLIPScheduler.from_pretrained(path, subfolder=scheduler_folder)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder", use_safetensors=True, dtype=dtype
        )
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        return prior, scheduler, text_encoder, tokenizer

    how = (
        f"run `hf download {checkpoint} --include 'prior/*' 'prior_scheduler/*' 'scheduler/*' "
        "'text_encoder/*' 'tokenizer/*'`"
    )
    return load_checkpoint(load, checkpoint, what="CLIPure-Diff prior", how_to_get=how)


@torch.no_grad()
def prior_condition(
    text_encoder: nn.Module, tokenizer: Any, prompts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The prior's text condition for the blank prompts, averaged over them as the
    official code averages its `text_embed` and `text_encodings`: the unit projected
    embeddings' mean, the hidden states' mean and the union of the attention masks
    (the union is our choice: the official code zeroes padded tokens before averaging).
    """
    device = next(text_encoder.parameters()).device
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    mask = tokens.attention_mask.bool().to(device)
    output = text_encoder(tokens.input_ids.to(device))
    embeds = F.normalize(output.text_embeds.float(), dim=-1).mean(dim=0, keepdim=True)
    hidden = output.last_hidden_state.float().masked_fill(~mask[..., None], 0.0)
    return {
        "proj_embedding": embeds,
        "encoder_hidden_states": hidden.mean(dim=0, keepdim=True),
        "attention_mask": mask.any(dim=0, keepdim=True),
    }


def build_diff(
    *,
    classifier: nn.Module,
    gradient: str = "exact",
    checkpoint: str | Path = DEFAULT_PRIOR,
    steps: int = STEPS,
    step_size: float = STEP_SIZE,
    normalization: str = NORMALIZATION,
    timesteps: tuple[int, int] = (900, 999),
    blank_templates: Sequence[str] | None = None,
    prior_clip_arch: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "fp32",
) -> CLIPurePurifiedClassifier:
    """CLIPure-Diff around a `CLIPZeroShotClassifier` (seed 000, Eq. 7, 9, Alg. 1), with a
    diffusers `PriorTransformer` standing in for DALL-E 2's DiffusionPrior.

    Args:
        checkpoint: a prior repository (hub id or local save_pretrained directory):
            `kakaobrain/karlo-v1-alpha` (default; our choice) or
            `kandinsky-community/kandinsky-2-1-prior`, both over CLIP ViT-L/14 embeddings.
        steps, step_size: 10 and 30 (App. C.3).
        timesteps: (900, 999), t ~ U{900..999} per step (App. C.3: "900 to 1000";
            `random.randint(900, 999)` in CLIPure_Diff.py).
        normalization: "sample" or "batch" (see `build_cos`).
        prior_clip_arch: the open_clip architecture the prior's embeddings come from
            (default: ViT-L-14, that of both public priors); the classifier must match it.
        dtype: of the prior and its text encoder (fp32 default).
    """
    from denoisers.registry import parse_dtype

    check_gradient(gradient)
    _check_clip(classifier, "clipure-diff")
    _check_steps(steps, step_size, normalization)
    torch_dtype = parse_dtype(dtype)
    expected_arch = prior_clip_arch or KNOWN_PRIORS.get(str(checkpoint), "ViT-L-14")
    if classifier.arch != expected_arch:
        raise PriorMismatchError(
            f"clipure-diff: the prior {checkpoint} models CLIP {expected_arch} image "
            f"embeddings, the classifier is CLIP {classifier.arch}: use --model clip-l14 "
            "(or give prior_clip_arch for a prior trained on another CLIP)"
        )
    prior, scheduler, text_encoder, tokenizer = load_prior(checkpoint, dtype=torch_dtype)
    clip_dim = classifier.class_embeddings.shape[-1]
    prior_dim = prior.clip_mean.shape[-1]
    if clip_dim != prior_dim:
        raise PriorMismatchError(
            f"clipure-diff: the prior {checkpoint} models {prior_dim}-d image embeddings, "
            f"the classifier's CLIP {classifier.arch} gives {clip_dim}-d ones"
        )
    if not torch.all(prior.clip_std > 0):
        raise PriorMismatchError(
            f"clipure-diff: the prior {checkpoint} has no embedding statistics (clip_std is "
            "not positive): it cannot map CLIP embeddings into its standardized space"
        )
    if blank_templates is None:
        from classifiers.datasets import default_templates

        templates = default_templates()
    else:
        templates = list(blank_templates)
    device_of = classifier.model.logit_scale.device
    text_encoder = text_encoder.to(device_of)
    condition = prior_condition(text_encoder, tokenizer, blank_prompts(templates))
    if gradient == "exact":
        # The exact gradient differentiates the prior twice; torch's fused attention
        # kernels (SDPA) have no double backward, so use diffusers' plain attention.
        from diffusers.models.attention_processor import AttnProcessor

        prior.set_attn_processor(AttnProcessor())
    likelihood = PriorLikelihood(prior.to(device_of), scheduler, condition, timesteps)
    settings = {
        "purifier": "clipure-diff",
        "checkpoint": str(checkpoint),
        "prior_stand_in": "diffusers PriorTransformer (not DALL-E 2's DiffusionPrior)",
        "prior_prediction_type": likelihood.prediction_type,
        "steps": steps,
        "step_size": float(step_size),
        "normalization": normalization,
        "timesteps": list(likelihood.timesteps),
        "blank_templates": "clip-imagenet-80" if blank_templates is None else templates,
        "dtype": str(torch_dtype).removeprefix("torch."),
    }
    model = CLIPurePurifiedClassifier(
        classifier, likelihood, gradient=gradient, steps=steps, step_size=step_size,
        normalization=normalization, settings=settings,
    )
    return _move(model, device)


def build_feature_cos(
    *,
    classifier: nn.Module,
    gradient: str = "exact",
    steps: int = STEPS,
    step_size: float = STEP_SIZE,
    normalization: str = NORMALIZATION,
    direction: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> FeatureCLIPureClassifier:
    """A CLIPure-style latent step for the embedded digits CNN (issue 9's digits-scale
    check; not registered, not a method of seed 000).

    The CNN has no text tower, so there is no blank prompt: t is the class-agnostic
    direction `direction` [64] if given, else the unit mean of the unit penultimate
    features of the digits train split (our choice: the "generic digit", as the blank
    prompt is the generic photo; the center of the last layer's class rows was tried
    first and is anti-aligned with every ReLU feature, cos -0.65..-0.37, so ascending
    toward it wrecked clean accuracy). The loop of `build_cos` turns the 64-d
    penultimate feature (after its ReLU) toward t, keeping its norm, and the last layer
    classifies it. Steps, step size, normalization and gradient modes are those of
    `build_cos`.
    """
    from classifiers.digits import DigitsCNN, load_digits_split

    check_gradient(gradient)
    if not isinstance(classifier, DigitsCNN):
        raise ValueError(
            f"the feature-space CLIPure step is written for the digits CNN; it cannot wrap "
            f"{type(classifier).__name__}"
        )
    _check_steps(steps, step_size, normalization)
    model = FeatureCLIPureClassifier(
        classifier, CosineLikelihood(torch.ones(1)), gradient=gradient, steps=steps,
        step_size=step_size, normalization=normalization, settings={},
    )
    if direction is None:
        train = load_digits_split("train")
        device_of = next(classifier.parameters()).device
        with torch.no_grad():
            features = model.image_embeddings(train.images.to(device_of))
            direction = F.normalize(features, dim=-1).mean(dim=0)
        source = "mean unit penultimate feature of the digits train split"
    else:
        source = "given"
    model.likelihood = CosineLikelihood(torch.as_tensor(direction).float())
    model.settings = {
        "purifier": "clipure-cos-features",
        "steps": steps,
        "step_size": float(step_size),
        "normalization": normalization,
        "direction": source,
        "gradient": gradient,
    }
    return model if device is None else model.to(device)
