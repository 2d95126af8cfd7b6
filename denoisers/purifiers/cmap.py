"""CMAP (seed 003): consistency-model latents fitted to the input, then a majority vote.

Zhang et al., "Adversarial Purification by Consistency-aware Latent Space Optimization on
Data Manifolds" (arXiv 2412.08394). For a test image x, K latents z_1..z_K ~ N(0, I) are
optimized so that the one-step generations G(z_k) of a pre-trained consistency model match
x (perceptual consistency restoration, Eq. 10) while the K latents keep the moments of the
latent distribution (latent distribution consistency constraint, Eq. 12):

    min_{z_1..z_K}  L_a + lambda * L_d                                          (Eq. 9)
    L_a = 1/K sum_k [ MAE(G(z_k), x) + gamma * (1 - SSIM(G(z_k), x)) ]          (Eq. 10)
    L_d = MSE(mu_hat, 0) + MSE(var_hat, 1)                                      (Eq. 12)

with mu_hat, var_hat the mean and (unbiased) variance over the K latents, per latent
dimension. The prediction is the label most of the K generated images get (Eq. 14).

The seed text lost its numbers, and the arXiv page reachable here gave no more; the
authors' code is not public. So every numeric default below is OUR CHOICE and recorded in
`settings`: K = 8 latents, 100 Adam steps of size 0.05, lambda = 1, gamma = 1, SSIM with
Wang et al.'s 11 x 11 Gaussian window of sigma 1.5 (narrowed to the largest odd size that
fits a smaller image, e.g. 7 for 8 x 8 digits). Other readings we chose, with reasons:

- The latent is z with x_T = sigma_max * z (the pipeline's `init_noise_sigma` scaling),
  so the target moments are exactly 0 and 1 and lambda does not depend on sigma_max.
- Moments per dimension over the K latents ("per_dimension"): the paper says larger K
  "reduces the bias in the estimation of mean and variance"; pooled over all K * D
  entries ("pooled", offered too) K would hardly matter.
- L_a averages over the K latents (a sum would tie lambda to K).

One-step generation is that of diffusers' `ConsistencyModelPipeline` with one inference
step and `CMStochasticIterativeScheduler` (checked against it in the tests):
G(z) = clip(c_skip * x_T + c_out * F(c_in * x_T, t)), x_T = sigma_max * z, with the
boundary-condition scalings at sigma_max, c_in = 1 / sqrt(sigma_max^2 + sigma_data^2),
t = 250 log(sigma_max), the clip to [-1, 1] when the scheduler says `clip_denoised`,
then mapped to [0, 1].

Class-conditional models (`num_class_embeds`, e.g. openai/diffusers-cd_imagenet64_l2):
the paper used unconditional ones, so the label given to each latent is an option,
`label_policy`: "random" (default, our choice; one label per latent drawn from the
generator, as the pipeline does when given none; it does not depend on x, so an attacker
cannot steer it), "fixed" (`label` for every latent), or "predicted" (the classifier's
prediction on the input x: what the model is asked to reproduce is then chosen by the
input, which an attacker controls).

Vote (Eq. 14) as logits: the purified model returns
    scores = votes + 0.5 * softmax(mean_k logits_k),
votes being how many of the K images the classifier assigns to each class. The added term
lies in (0, 0.5), so argmax(scores) is the majority vote, and a tie goes to the class
with the larger mean logit. The votes are piecewise constant (zero gradient); for attacks,
the backward pass of `scores` is that of the mean of the K classifier logits
(straight-through: value of `scores`, gradient of `mean_k logits_k`), the logit average
EOT uses, so a loss on the purified model's output is differentiated as if the output
were the ensemble's mean logits.

Gradient modes (`gradient`), what an attacker's d/dx sees:
- "exact": the whole inner loop is differentiated (each step's gradient built with
  `create_graph=True`, Adam written out so its update is differentiable): second order,
  memory grows with the number of steps. Fine at tiny sizes; use it where it fits.
- "official": the authors' code is not public. Run as described (Remark 1: the latents
  are the optimized leaves; x reaches them only through detached updates) the purified
  images do not depend differentiably on x at all. We keep the one dependence that costs
  a single second-order step: every update is detached except the last, so the gradient
  flows through the last update and the final generation (truncated backpropagation).
- "bpda": forward unchanged, each generated image's backward is the identity to x
  (Athalye et al. 2018), i.e. the classifier's gradient at the K purified images, summed.
The paper's own PGD/AutoAttack rows attack a surrogate (a diffusion process simulated
from a mid timestep, after Lee & Kim 2023); that surrogate is not implemented here.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from denoisers.purifiers.base import PurifiedClassifier, check_gradient
from denoisers.registry import (
    CheckpointError,
    UnreadableCheckpointError,
    load_checkpoint,
    locate,
)

# The consistency model trained on the digits by denoisers/train_digits_cm.py.
BUNDLED_DIGITS_CM = Path(__file__).resolve().parents[1] / "weights" / "digits_cm"

LABEL_POLICIES: tuple[str, ...] = ("random", "fixed", "predicted")
MOMENTS: tuple[str, ...] = ("per_dimension", "pooled")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
UNET_CONFIGS = ("unet/config.json",)
SCHEDULER_CONFIGS = ("scheduler/scheduler_config.json",)
# Adam's constants: torch.optim.Adam's defaults.
_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


class ConsistencyFunction(nn.Module):
    """f(x_sigma, sigma) of a diffusers consistency model: `UNet2DModel` +
    `CMStochasticIterativeScheduler` (Song et al. 2023, Eq. 5; diffusers' parameterization).

    `generate(z, labels)` is the one-step generation of `ConsistencyModelPipeline` from a
    standard-normal latent z, as an image in [0, 1]. The weights are frozen.
    """

    def __init__(self, unet: nn.Module, scheduler: Any):
        super().__init__()
        config = scheduler.config
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.sigma_min = float(config.sigma_min)
        self.sigma_max = float(config.sigma_max)
        self.sigma_data = float(config.sigma_data)
        self.clip_denoised = bool(config.clip_denoised)
        self.channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        self.sample_size = (size, size) if isinstance(size, int) else tuple(size)
        classes = unet.config.num_class_embeds
        self.num_classes = None if classes is None else int(classes)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out (boundary condition, f = identity at sigma_min) and c_in."""
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition(sigma)
        c_in = 1.0 / (sigma**2 + self.sigma_data**2).sqrt()
        return c_skip, c_out, c_in

    def forward(
        self, x_sigma: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The clean estimate in [-1, 1] space (not clipped) of x_sigma at noise sigma [B]."""
        sigma = sigma.to(x_sigma.dtype).view(-1, 1, 1, 1)
        c_skip, c_out, c_in = self.scalings(sigma)
        timestep = 250.0 * torch.log(sigma.flatten())  # the scheduler's sigma_to_t
        out = self.unet(c_in * x_sigma, timestep, class_labels=labels, return_dict=False)[0]
        return c_skip * x_sigma + c_out * out

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """G(z) in [0, 1]: one step from x_T = sigma_max * z, as the pipeline does."""
        sigma = torch.full((z.shape[0],), self.sigma_max, dtype=z.dtype, device=z.device)
        x0 = self(self.sigma_max * z, sigma, labels)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return (x0 + 1.0) / 2.0

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
    ) -> ConsistencyFunction:
        """Load a `ConsistencyModelPipeline` layout (`unet/`, `scheduler/`): a hub id such
        as openai/diffusers-cd_imagenet64_l2 (from the local cache) or a directory."""
        from diffusers import CMStochasticIterativeScheduler, UNet2DModel

        from denoisers.registry import dtype_kwargs

        def load(path: str) -> tuple[Any, Any]:
            locate(path, UNET_CONFIGS)
            locate(path, SCHEDULER_CONFIGS)
            # diffusers loads another scheduler's config into this class with only a
            # warning; a DDPM's schedule is not a consistency model's: refuse it.
            kind = CMStochasticIterativeScheduler.load_config(path, subfolder="scheduler")
            if kind.get("_class_name") != "CMStochasticIterativeScheduler":
                raise UnreadableCheckpointError(
                    f"consistency model: {path} has a {kind.get('_class_name')} scheduler, "
                    "not a CMStochasticIterativeScheduler (is it a consistency model?)"
                )
            unet = UNet2DModel.from_pretrained(
                path, subfolder="unet", use_safetensors=True, variant=variant,
                **dtype_kwargs(dtype),
            )
            scheduler = CMStochasticIterativeScheduler.from_pretrained(path, subfolder="scheduler")
            return unet, scheduler

        unet, scheduler = load_checkpoint(
            load, checkpoint, what="consistency model", variant=variant
        )
        return cls(unet, scheduler).to(device)


class CMAPPurifier(nn.Module):
    """K latents fitted to x through a one-step consistency model (Eq. 9-12).

    `purify_all(x, generator)` returns the K generated images of each input
    ([B, K, C, H, W] in [0, 1]); `purify(x, generator)` the first of them (the paper's
    "w/o vote" ablation: the latents are exchangeable, so the first is a random one).
    """

    random = True

    def __init__(
        self,
        model: ConsistencyFunction,
        *,
        gradient: str = "exact",
        num_latents: int = 8,
        steps: int = 100,
        lr: float = 0.05,
        distribution_weight: float = 1.0,
        ssim_weight: float = 1.0,
        ssim_kernel_size: int = 11,
        ssim_sigma: float = 1.5,
        moments: str = "per_dimension",
        optimizer: str = "adam",
        label_policy: str = "random",
        label: int | None = None,
        resize: bool = False,
    ):
        super().__init__()
        self.model = model
        self.gradient = check_gradient(gradient)
        _check_int(num_latents=num_latents, steps=steps)
        if num_latents < 2 and moments == "per_dimension":
            raise ValueError("per-dimension moments need num_latents >= 2 (a variance over K)")
        for name, value in (("lr", lr), ("ssim_sigma", ssim_sigma)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name, value in (("distribution_weight", distribution_weight),
                            ("ssim_weight", ssim_weight)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        _check_choice("moments", moments, MOMENTS)
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("label_policy", label_policy, LABEL_POLICIES)
        if model.num_classes is None:
            if label is not None:
                raise ValueError("label given, but the consistency model is unconditional")
        elif label_policy == "fixed":
            if label is None or not 0 <= int(label) < model.num_classes:
                raise ValueError(
                    f"label_policy 'fixed' needs a label in 0..{model.num_classes - 1}, "
                    f"got {label}"
                )
        elif label is not None:
            raise ValueError(f"label is used only with label_policy 'fixed', not {label_policy!r}")
        height, width = model.sample_size
        fitting = min(height, width) if min(height, width) % 2 else min(height, width) - 1
        self.ssim_kernel_size = min(int(ssim_kernel_size), fitting)
        if self.ssim_kernel_size < 3 or self.ssim_kernel_size % 2 == 0:
            raise ValueError(f"ssim_kernel_size must be odd and >= 3, got {ssim_kernel_size}")
        self.num_latents = int(num_latents)
        self.steps = int(steps)
        self.lr = float(lr)
        self.distribution_weight = float(distribution_weight)
        self.ssim_weight = float(ssim_weight)
        self.ssim_sigma = float(ssim_sigma)
        self.moments = moments
        self.optimizer = optimizer
        self.label_policy = label_policy
        self.label = None if label is None else int(label)
        self.resize = bool(resize)

    # -- the objective ---------------------------------------------------------------

    def ssim(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """SSIM of each image pair, [N] (torchmetrics' Gaussian-window SSIM, data range 1)."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        return structural_similarity_index_measure(
            images, target, kernel_size=self.ssim_kernel_size, sigma=self.ssim_sigma,
            data_range=1.0, reduction="none",
        )

    def restoration_loss(self, images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """L_a of Eq. 10 for each input, [B]: images [B, K, C, H, W] against x [B, C, H, W]."""
        batch, k = images.shape[:2]
        mae = (images - x[:, None]).abs().flatten(2).mean(2)
        target = x[:, None].expand_as(images).flatten(0, 1)
        ssim = self.ssim(images.flatten(0, 1), target).view(batch, k)
        return (mae + self.ssim_weight * (1.0 - ssim)).mean(1)

    def distribution_loss(self, z: torch.Tensor) -> torch.Tensor:
        """L_d of Eq. 12 for each input, [B]: latents z [B, K, ...] against N(0, I)."""
        flat = z.flatten(2)  # [B, K, D]
        if self.moments == "pooled":
            flat = flat.flatten(1)[:, :, None]  # one sample of B * K * D values per input
        mean = flat.mean(1)
        variance = flat.var(1, correction=1)
        return mean.pow(2).mean(1) + (variance - 1.0).pow(2).mean(1)

    def objective(
        self, z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_a + lambda * L_d for each input [B], the generated images [B, K, C, h, w])."""
        batch, k = z.shape[:2]
        flat_labels = None if labels is None else labels.flatten()
        images = self.model.generate(z.flatten(0, 1), flat_labels).view(batch, k, *z.shape[2:])
        loss = self.restoration_loss(images, x)
        if self.distribution_weight:
            loss = loss + self.distribution_weight * self.distribution_loss(z)
        return loss, images

    # -- the optimization ------------------------------------------------------------

    def initial_latents(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shape = (x.shape[0], self.num_latents, self.model.channels, *self.model.sample_size)
        return torch.randn(shape, generator=generator, device=generator.device).to(
            device=x.device, dtype=x.dtype
        )

    def class_labels(
        self, x: torch.Tensor, generator: torch.Generator, predicted: torch.Tensor | None
    ) -> torch.Tensor | None:
        """[B, K] labels for a class-conditional model (see `label_policy`), else None."""
        classes = self.model.num_classes
        if classes is None:
            return None
        shape = (x.shape[0], self.num_latents)
        if self.label_policy == "fixed":
            return torch.full(shape, self.label, dtype=torch.long, device=x.device)
        if self.label_policy == "random":
            drawn = torch.randint(classes, shape, generator=generator, device=generator.device)
            return drawn.to(x.device)
        if predicted is None:
            raise ValueError("label_policy 'predicted' needs the classifier's predictions")
        predicted = predicted.to(device=x.device, dtype=torch.long)
        if predicted.min() < 0 or predicted.max() >= classes:
            raise ValueError(
                f"label_policy 'predicted': the classifier predicts classes outside the "
                f"consistency model's 0..{classes - 1}"
            )
        return predicted[:, None].expand(shape)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """x at the consistency model's resolution (checked, or resized with `resize`)."""
        if x.dim() != 4 or x.shape[1] != self.model.channels:
            raise ValueError(
                f"expected a batch [B, {self.model.channels}, H, W] for this consistency "
                f"model, got shape {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) == self.model.sample_size:
            return x
        if not self.resize:
            height, width = self.model.sample_size
            raise ValueError(
                f"the consistency model generates {height}x{width} images, the input is "
                f"{x.shape[-2]}x{x.shape[-1]}; pass resize=True to fit it to the model"
            )
        return F.interpolate(
            x, size=self.model.sample_size, mode="bilinear", align_corners=False, antialias=True
        )

    def optimize(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None,
        predicted: torch.Tensor | None = None,
        history: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The optimized latents [B, K, C, h, w] and the labels they were generated with.

        `history`, if given, receives the objective [B] before each step and after the
        last (steps + 1 entries, detached)."""
        from smoothing.core import _generator_for  # the project's one seeding rule

        generator = _generator_for(x, generator)
        target = self.target(x)
        labels = self.class_labels(x, generator, predicted)
        z = self.initial_latents(x, generator)
        # Differentiable in x only where an attacker asks for it: without a graph to x
        # (evaluation, bpda) every mode runs the same detached loop.
        tracked = torch.is_grad_enabled() and x.requires_grad and self.gradient != "bpda"
        first = torch.zeros_like(z)
        second = torch.zeros_like(z)
        with torch.enable_grad():
            for step in range(1, self.steps + 1):
                keep = tracked and (self.gradient == "exact" or step == self.steps)
                if not keep:
                    z = z.detach()
                    first, second = first.detach(), second.detach()
                if not z.requires_grad:
                    z.requires_grad_(True)
                with _twice_differentiable(keep):
                    loss, _ = self.objective(z, target if keep else target.detach(), labels)
                if history is not None:
                    history.append(loss.detach())
                # The examples' objectives are independent: the gradient of their sum is
                # each one's own gradient.
                (grad,) = torch.autograd.grad(loss.sum(), z, create_graph=keep)
                z, first, second = self._update(z, grad, first, second, step)
            if history is not None:
                history.append(self.objective(z.detach(), target.detach(), labels)[0].detach())
        return (z if tracked else z.detach()), labels

    def _update(
        self,
        z: torch.Tensor,
        grad: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Written out rather than torch.optim: torch.optim updates its leaves in place,
        # outside autograd, and "exact" needs the update itself to be differentiable.
        # Same arithmetic as torch.optim.Adam/SGD with their defaults (no weight decay).
        if self.optimizer == "sgd":
            return z - self.lr * grad, first, second
        beta1, beta2 = _BETAS
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        first_hat = first / (1 - beta1**step)
        second_hat = second / (1 - beta2**step)
        return z - self.lr * first_hat / (second_hat.sqrt() + _ADAM_EPS), first, second

    def purify_all(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None,
        predicted: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The K generated images of each input, [B, K, C, H, W] in [0, 1] (x's size)."""
        z, labels = self.optimize(x, generator, predicted)
        batch, k = z.shape[:2]
        flat_labels = None if labels is None else labels.flatten()
        images = self.model.generate(z.flatten(0, 1), flat_labels)
        if tuple(images.shape[-2:]) != tuple(x.shape[-2:]):
            images = F.interpolate(
                images, size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
        return images.view(batch, k, *images.shape[1:])

    def purify(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.purify_all(x, generator)[:, 0]

    def settings(self) -> dict[str, Any]:
        return {
            "num_latents": self.num_latents,
            "steps": self.steps,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "distribution_weight": self.distribution_weight,
            "ssim_weight": self.ssim_weight,
            "ssim_kernel_size": self.ssim_kernel_size,
            "ssim_sigma": self.ssim_sigma,
            "moments": self.moments,
            "variance": "unbiased (K - 1)",
            "latent": "z ~ N(0, I), x_T = sigma_max * z",
            "label_policy": self.label_policy if self.model.num_classes is not None else None,
            "label": self.label,
            "resize": self.resize,
            "sigma_max": self.model.sigma_max,
            "sigma_min": self.model.sigma_min,
            "sigma_data": self.model.sigma_data,
            "clip_denoised": self.model.clip_denoised,
            "sample_size": list(self.model.sample_size),
            "vote": "votes + 0.5 * softmax(mean logits); backward: mean of the K logits",
        }


class CMAPClassifier(PurifiedClassifier):
    """The purified model: the majority vote of `classifier` over the K images of CMAP.

    Returns scores [B, num_classes] whose argmax is the vote (see the module docstring).
    """

    purifier: CMAPPurifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        predicted = None
        if self.purifier.label_policy == "predicted" and self.purifier.model.num_classes:
            with torch.no_grad():
                predicted = self.classifier(x).argmax(1)
        if self.gradient == "bpda":
            with torch.no_grad():
                purified = self.purifier.purify_all(x, self.generator, predicted)
            copies = x[:, None].expand_as(purified)
            # BPDA's identity backward for K outputs per input (smoothing.attacks.BPDA
            # takes one output shaped like its input): value of the purified images,
            # gradient of x copied K times.
            images = copies + (purified - copies).detach()
        else:
            images = self.purifier.purify_all(x, self.generator, predicted)
        batch, k = images.shape[:2]
        logits = self.classifier(images.flatten(0, 1)).view(batch, k, -1)
        return majority_vote(logits)


def _twice_differentiable(needed: bool) -> contextlib.AbstractContextManager:
    """Attention by SDPA's math kernel where a step's gradient must itself be differentiated:
    the fused CPU/GPU kernels have no double backward (PyTorch raises "derivative for
    ..._flash_attention..._backward is not implemented"); the math kernel is plain ops."""
    if not needed:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def majority_vote(logits: torch.Tensor) -> torch.Tensor:
    """[B, K, N] logits of K images -> scores [B, N]: argmax = the most frequent argmax of
    the K, ties to the larger mean logit; backward = that of the mean logits."""
    classes = logits.shape[-1]
    mean = logits.mean(1)
    votes = F.one_hot(logits.argmax(-1), classes).sum(1).to(mean.dtype)
    scores = votes + 0.5 * torch.softmax(mean.detach(), dim=-1)
    if not mean.requires_grad:
        return scores
    return scores + (mean - mean.detach())


def build(
    *,
    classifier: nn.Module,
    gradient: str = "exact",
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    **hyperparameters: Any,
) -> CMAPClassifier:
    """CMAP around `classifier` with the consistency model at `checkpoint`.

    `checkpoint`: a `ConsistencyModelPipeline` directory or hub id (e.g.
    openai/diffusers-cd_imagenet64_l2, read from the local Hugging Face cache); by default
    the digits consistency model bundled with the package (8 x 8, 1 channel).
    `hyperparameters` are `CMAPPurifier`'s keywords, with its defaults, all of them our
    choice (the seed lost its numbers; module docstring): `num_latents` K = 8, `steps` 100,
    `lr` 0.05 (`optimizer` "adam" or "sgd"), `distribution_weight` lambda = 1,
    `ssim_weight` gamma = 1, SSIM window 11 / sigma 1.5, `moments` "per_dimension" or
    "pooled", `label_policy` "random" | "fixed" (with `label`) | "predicted" for
    class-conditional models, `resize` to fit inputs of another size to the model's.
    `gradient`: "exact", "official" or "bpda" (module docstring).
    """
    check_gradient(gradient)
    if not isinstance(classifier, nn.Module):
        raise ValueError(
            f"CMAP wraps a torch.nn.Module classifier (images in [0, 1] -> logits), got "
            f"{type(classifier).__name__}"
        )
    known = set(inspect.signature(CMAPPurifier).parameters) - {"model"}
    unknown = sorted(set(hyperparameters) - known)
    if unknown:  # before the model is loaded
        raise ValueError(f"CMAP has no option {', '.join(unknown)}")
    if checkpoint is None:
        checkpoint = BUNDLED_DIGITS_CM
        if not (Path(checkpoint) / "unet").is_dir():
            raise CheckpointError(
                "CMAP needs a consistency model: pass checkpoint=... (a "
                "ConsistencyModelPipeline directory or hub id such as "
                "openai/diffusers-cd_imagenet64_l2); no bundled digits model is installed"
            )
    model = ConsistencyFunction.from_pretrained(checkpoint, device=device, variant=variant)
    purifier = CMAPPurifier(model, gradient=gradient, **hyperparameters)
    settings = {"purifier": "cmap", "checkpoint": str(checkpoint), "variant": variant,
                **purifier.settings()}
    return CMAPClassifier(purifier, classifier.to(device), gradient=gradient, settings=settings)


def _check_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")
