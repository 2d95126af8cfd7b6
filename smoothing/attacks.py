"""Empirical attacks on base and smoothed classifiers: threat models, PGD, SmoothAdv, BPDA, EOT.

Model-agnostic like `smoothing.core`: a model is any `torch.nn.Module` mapping a batch
[B, C, H, W] in [0, 1] to logits [B, K]. Randomness (random starts, SmoothAdv's noise)
comes from the `torch.Generator` the caller passes, never from global state; give an
attack its own generator, not the one PREDICT or CERTIFY will evaluate with, or the
evaluation reuses the very noise the attack was optimized against.

- `ThreatModel(norm, eps)`: the L2 or Linf ball of radius eps around x, intersected with
  [0, 1]^d; exact Euclidean projection onto it, random start inside it.
- `pgd`: projected gradient ascent on a loss of the model (Madry et al. 2018), with seed
  004's settings (App. A.3) by default: 100 steps, step size 4/3 * eps / steps, random
  start, last iterate returned. L2 steps go along the normalized gradient, Linf along its
  sign.
- `smoothadv`: the same ascent on the smoothed soft classifier (Salman et al. 2019):
  maximize -log((1/m) sum_i softmax(f(x' + eta_i))_y) with m noise draws per example,
  drawn once and kept over all steps (as the reference implementation's PGD variant
  does); m = m_test = 32 by default (seed 004, App. A.3). The gradient over the m draws
  is computed chunk by chunk and equals the one-pass gradient.
- `BPDA` and `EOT`: module wrappers for defenses that are not differentiable or are
  random (Athalye et al. 2018), to put in front of / around a model before attacking it.
- `SmoothedSoftClassifier`: the smoothed soft classifier on fixed noise as a module of
  log-probabilities, for attacks written for a classifier (AutoAttack) to attack the
  smoothed one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from smoothing.core import NonFiniteOutputError, _generator_for
from smoothing.noise import gaussian_noise

Norm = Literal["l2", "linf"]
NORMS: tuple[str, ...] = ("l2", "linf")

# Bisection steps of the L2 projection: 2^-60 is below float64 resolution of t in [0, 1].
_BISECTION_STEPS = 60

# `loss(logits, y) -> [B]`, the quantity an attack maximizes for each example.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# `callback(step, x_adv)`: sees the start (step 0) and every iterate; must not modify x_adv.
Callback = Callable[[int, torch.Tensor], None]


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1], to broadcast against a batch shaped like `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """The perturbations allowed around x: {x' : ||x' - x|| <= eps} intersected with [0, 1]^d.

    `norm` is "l2" or "linf"; the norm is taken over each example of a [B, ...] batch.
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {', '.join(NORMS)}")
        eps = self.eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a number, got {type(eps).__name__}")
        if not (eps > 0 and math.isfinite(eps)):  # also rejects NaN
            raise ValueError(f"eps must be a positive finite number, got {eps}")

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """||x_adv - x|| for each example: a [B] tensor."""
        order = 2 if self.norm == "l2" else math.inf
        return torch.linalg.vector_norm((x_adv - x).flatten(1), ord=order, dim=1)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The point of the threat model around x nearest to x_adv (Euclidean projection).

        The result lies in [0, 1] exactly and in the ball up to rounding.
        """
        if self.norm == "linf":
            # the intersection of two boxes is a box: clamp coordinate-wise
            return torch.clamp(x_adv, (x - self.eps).clamp(min=0), (x + self.eps).clamp(max=1))
        # L2 ball intersected with the box. Written by hand (no library projects onto this
        # intersection): the KKT conditions give z = clamp(x + t (x_adv - x), 0, 1) for a
        # t in (0, 1] (t = 1 / (1 + lambda), lambda the ball's multiplier), with t = 1 if
        # that point is inside the ball and ||z - x|| = eps otherwise. ||z(t) - x|| grows
        # with t, so bisection finds t; the lower end keeps every answer inside the ball.
        delta = x_adv - x

        def at(t: torch.Tensor) -> torch.Tensor:
            return torch.clamp(x + _per_example(t, x) * delta, 0, 1)

        whole = torch.clamp(x + delta, 0, 1)  # at(1): multiplying by 1 changes no bit
        inside = self.distance(whole, x) <= self.eps
        if bool(inside.all()):
            return whole
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        low, high = torch.where(inside, ones, 0.0), ones
        for step in range(1, _BISECTION_STEPS + 1):
            middle = (low + high) / 2
            # Once every middle equals its low or its high (adjacent floats: float32 gets
            # there after about 25 halvings, float64 after about 55), the remaining steps
            # change nothing: low is always feasible and high infeasible (or equal to
            # low), so the same test at the same point keeps both. Stopping then returns
            # the very same bits; it is checked every 8 steps (each check is a sync).
            if step % 8 == 0 and bool(((middle == low) | (middle == high)).all()):
                break
            ok = self.distance(at(middle), x) <= self.eps
            low, high = torch.where(ok, middle, low), torch.where(ok, high, middle)
        return at(low)

    def random_start(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random point of the threat model: uniform in the ball, then projected on [0, 1].

        Linf: uniform in the cube (Madry et al.). L2: uniform in the ball (a Gaussian
        direction, radius eps * U^(1/d)).
        """
        like = {"device": x.device, "dtype": x.dtype}
        if self.norm == "linf":
            delta = (2 * torch.rand(x.shape, generator=generator, **like) - 1) * self.eps
        else:
            direction = torch.randn(x.shape, generator=generator, **like)
            direction = direction / _per_example(direction.flatten(1).norm(dim=1), x)
            dims = x[0].numel()
            uniform = torch.rand(x.shape[0], generator=generator, **like)
            delta = direction * _per_example(self.eps * uniform ** (1.0 / dims), x)
        return self.project(x + delta, x)

    def ascent_step(
        self, x_adv: torch.Tensor, gradient: torch.Tensor, step_size: float
    ) -> torch.Tensor:
        """One unprojected step of steepest ascent for this norm.

        L2: along the gradient normalized per example (a zero gradient: no move);
        Linf: along its sign.
        """
        if self.norm == "linf":
            return x_adv + step_size * gradient.sign()
        norms = gradient.flatten(1).norm(dim=1)
        scale = torch.where(norms > 0, step_size / norms, 0.0)
        return x_adv + _per_example(scale, x_adv) * gradient


def default_step_size(eps: float, steps: int) -> float:
    """4/3 * eps / steps: seed 004, App. A.3 (for PGD-100 at eps 0.5 and 1.0)."""
    return 4.0 / 3.0 * eps / steps


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The untargeted loss: cross-entropy of each example, shape [B]."""
    return F.cross_entropy(logits, y, reduction="none")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int = 100,
    step_size: float | None = None,
    random_start: bool = True,
    targeted: bool = False,
    loss: Loss = cross_entropy_loss,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """PGD on `model` (Madry et al. 2018): the last iterate, a batch shaped like x.

    Maximizes `loss(model(x'), y)` over the threat model around x (untargeted
    cross-entropy by default); `targeted=True` minimizes it instead, y then being the
    target classes. `step_size` defaults to 4/3 * eps / steps (seed 004, App. A.3). The
    random start draws from `generator` (a fresh, unseeded one if None). Examples are
    attacked independently, so the model should be in eval mode (batch norm in training
    mode couples them).
    """
    _check_attack(x, y, steps)
    step_size = _step_size(threat, steps, step_size)
    sign = -1.0 if targeted else 1.0

    @torch.enable_grad()  # also when called inside a no_grad block
    def gradient(x_adv: torch.Tensor) -> torch.Tensor:
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        _check_output(logits, x_adv.shape[0])
        return sign * _input_gradient(loss(logits, y).sum(), x_adv)

    return _ascend(gradient, x, threat, steps, step_size, random_start, generator, callback)


def draw_noise(
    x: torch.Tensor, m: int, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """m draws of N(0, sigma^2 I) for each example of x: a [B, m, C, H, W] tensor, drawn
    by `smoothing.noise.gaussian_noise`, the sampler of CERTIFY and PREDICT."""
    _check_positive_int(m=m)
    shape = (x.shape[0], m, *x.shape[1:])
    return gaussian_noise(shape, sigma, generator, dtype=x.dtype, device=x.device)


@torch.enable_grad()  # also when called inside a no_grad block
def smoothed_log_probability(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log((1/m) sum_i softmax(model(x + noise_i))_y) per example, and its gradient in x.

    `noise` is [B, m, C, H, W] (see `draw_noise`); `chunk` noise draws per example go
    through the model at once (all m if None), so a forward pass sees B * chunk images.
    The value and gradient do not depend on `chunk`: with S_c the sum of p_i over chunk
    c and S = sum_c S_c, grad log S = sum_c (S_c / S) grad log S_c, accumulated in log
    space so that small probabilities do not underflow. Returns ([B], [B, C, H, W]).
    """
    m = noise.shape[1]
    if noise.shape[0] != x.shape[0] or noise.shape[2:] != x.shape[1:]:
        raise ValueError(f"noise of shape {tuple(noise.shape)} does not fit x {tuple(x.shape)}")
    chunk = m if chunk is None else chunk
    _check_positive_int(chunk=chunk)
    x = x.detach().requires_grad_(True)
    log_total = gradient = None
    for start in range(0, m, chunk):
        draws = noise[:, start : start + chunk]
        size = draws.shape[1]
        logits = model((x.unsqueeze(1) + draws).flatten(0, 1))
        _check_output(logits, x.shape[0] * size)
        log_p = F.log_softmax(logits, dim=1).gather(1, y.repeat_interleave(size)[:, None])
        log_chunk = torch.logsumexp(log_p.view(-1, size), dim=1)  # log S_c, [B]
        chunk_gradient = _input_gradient(log_chunk.sum(), x)
        log_chunk = log_chunk.detach()
        if log_total is None:
            log_total, gradient = log_chunk, chunk_gradient
        else:
            new_total = torch.logaddexp(log_total, log_chunk)
            gradient = (
                _per_example((log_total - new_total).exp(), x) * gradient
                + _per_example((log_chunk - new_total).exp(), x) * chunk_gradient
            )
            log_total = new_total
    return log_total - math.log(m), gradient


def smoothadv(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    sigma: float,
    *,
    m: int = 32,
    steps: int = 100,
    step_size: float | None = None,
    random_start: bool = True,
    targeted: bool = False,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """SmoothAdv (Salman et al. 2019): PGD on the smoothed soft classifier of `model`.

    Maximizes -log((1/m) sum_i softmax(model(x' + eta_i))_y) (targeted: minimizes it),
    with eta_i ~ N(0, sigma^2 I), m draws per example drawn once from `generator` and kept
    over all steps. Steps, step size and random start as in `pgd`. `generator` gives the
    noise first, then the random start; a fresh, unseeded one is used if None. `chunk`
    bounds memory (see `smoothed_log_probability`), not the result. Gradients go through
    the whole model (a denoiser included).
    """
    _check_attack(x, y, steps)
    step_size = _step_size(threat, steps, step_size)
    generator = _generator_for(x, generator)
    noise = draw_noise(x, m, sigma, generator)
    sign = 1.0 if targeted else -1.0

    def gradient(x_adv: torch.Tensor) -> torch.Tensor:
        return sign * smoothed_log_probability(model, x_adv, y, noise, chunk)[1]

    return _ascend(gradient, x, threat, steps, step_size, random_start, generator, callback)


class BPDA(nn.Module):
    """Backward Pass Differentiable Approximation (Athalye et al. 2018) of a defense.

    The forward pass is `forward_module(x)`, unchanged; the backward pass is that of
    `backward_module` at the same x: the identity if None (for a purifier whose output
    approximates its input, hence shaped like it). Wrap the non-differentiable part only,
    e.g. `nn.Sequential(BPDA(purifier), classifier)`.
    """

    def __init__(self, forward_module: nn.Module, backward_module: nn.Module | None = None):
        super().__init__()
        self.forward_module = forward_module
        self.backward_module = backward_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BPDAFunction.apply(x, self.forward_module, self.backward_module)


class _BPDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_module, backward_module):  # runs without autograd
        out = forward_module(x)
        if backward_module is None and out.shape != x.shape:
            raise ValueError(
                f"BPDA with the identity backward needs an output shaped like the input, "
                f"got {tuple(out.shape)} from {tuple(x.shape)}; give a backward_module"
            )
        ctx.save_for_backward(x)
        ctx.backward_module = backward_module
        return out

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_module is None:
            return grad_output, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.backward_module(x), x, grad_output)
        return grad, None, None


class EOT(nn.Module):
    """Expectation over Transformation (Athalye et al. 2018) for a random defense.

    The output is the mean of `samples` calls of `module` on x, each drawing the defense's
    own randomness, so its gradient is the average of their gradients. Wrapping a
    classifier averages its logits; the attack's loss is taken at that average.
    """

    def __init__(self, module: nn.Module, samples: int):
        super().__init__()
        _check_positive_int(samples=samples)
        self.module = module
        self.samples = samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one call per sample (not one repeated batch): a defense may draw its randomness
        # once per call, and repeated copies of x in one batch would then share it
        total = self.module(x)
        for _ in range(self.samples - 1):
            total = total + self.module(x)
        return total / self.samples


def _ascend(
    gradient: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    step_size: float,
    random_start: bool,
    generator: torch.Generator | None,
    callback: Callback | None,
) -> torch.Tensor:
    """Projected steepest ascent of an objective given by its gradient; the last iterate."""
    x = x.detach()
    if random_start:
        x_adv = threat.random_start(x, _generator_for(x, generator))
    else:
        x_adv = x.clone()
    if callback is not None:
        callback(0, x_adv)
    for step in range(1, steps + 1):
        x_adv = threat.project(threat.ascent_step(x_adv, gradient(x_adv), step_size), x)
        if callback is not None:
            callback(step, x_adv)
    return x_adv


def _input_gradient(objective: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(objective, x, allow_unused=True)
    if grad is None:
        raise TypeError(
            "the model's output does not depend differentiably on its input; wrap a "
            "non-differentiable defense in BPDA"
        )
    if not torch.isfinite(grad).all():
        raise NonFiniteOutputError("the gradient of the attack's objective is NaN or inf")
    return grad


def _check_output(logits: torch.Tensor, rows: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model must return a tensor of logits, got {type(logits).__name__}")
    if not logits.requires_grad:
        raise TypeError(
            "the model's output does not require grad (inference mode, no_grad or detach "
            "inside it?); attacks need input gradients: wrap a non-differentiable defense "
            "in BPDA"
        )
    if logits.dim() != 2 or logits.shape[0] != rows:
        raise ValueError(f"expected logits [{rows}, K], got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise NonFiniteOutputError("the model returned NaN or inf")


def _check_attack(x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("x must be a float batch [B, C, H, W]")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("x must lie in [0, 1] (and be finite)")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}]")
    _check_positive_int(steps=steps)


def _check_positive_int(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _step_size(threat: ThreatModel, steps: int, step_size: float | None) -> float:
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if step_size is None:
        return default_step_size(threat.eps, steps)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive finite number, got {step_size}")
    return float(step_size)


class SmoothedSoftClassifier(nn.Module):
    """The smoothed soft classifier of `model` on fixed noise, as log-probabilities.

    forward(x [B, C, H, W]) = log((1/m) sum_i softmax(model(x_b + noise_i))) per class,
    [B, K], for the m draws of `noise` [m, C, H, W] (the same draws for every example of
    the batch and every call: draw them once per example, e.g. with `draw_noise`, from the
    attack's own generator). These are log-probabilities, so cross-entropy on them is
    SmoothAdv's objective -log((1/m) sum_i softmax(model(x + noise_i))_y): a library attack
    that maximizes cross-entropy of "logits" (AutoAttack's APGD-CE) attacks the smoothed
    classifier through it.

    `chunk` noise draws per example go through the model at once (all m if None). With
    chunks, each chunk runs under activation checkpointing (torch.utils.checkpoint), so the
    backward pass recomputes one chunk at a time and memory is bounded by a chunk, as in
    `smoothed_log_probability`; the value and gradient do not depend on `chunk`. A model
    that draws randomness of its own would draw it again in that recomputation: give such
    a model no `chunk`.
    """

    def __init__(self, model: nn.Module, noise: torch.Tensor, chunk: int | None = None):
        super().__init__()
        if not isinstance(noise, torch.Tensor) or noise.dim() < 2:
            raise ValueError("noise must be a tensor [m, C, H, W]")
        if chunk is not None:
            _check_positive_int(chunk=chunk)
            if getattr(model, "random", False) and chunk < noise.shape[0]:
                raise ValueError(
                    "a random model would redraw its randomness when a chunk is recomputed; "
                    "use chunk=None"
                )
        self.model = model
        self.noise = noise
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.noise.shape[0]
        if x.shape[1:] != self.noise.shape[1:]:
            raise ValueError(
                f"noise of shape {tuple(self.noise.shape)} does not fit x {tuple(x.shape)}"
            )
        chunk = m if self.chunk is None else self.chunk
        log_total = None
        for start in range(0, m, chunk):
            draws = self.noise[start : start + chunk]
            if chunk < m and torch.is_grad_enabled():
                log_chunk = torch.utils.checkpoint.checkpoint(
                    self._log_sum_softmax, x, draws, use_reentrant=False
                )
            else:
                log_chunk = self._log_sum_softmax(x, draws)
            log_total = log_chunk if log_total is None else torch.logaddexp(log_total, log_chunk)
        return log_total - math.log(m)

    def _log_sum_softmax(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """log sum_i softmax(model(x_b + draws_i)) per example and class: [B, K]."""
        size = draws.shape[0]
        logits = self.model((x.unsqueeze(1) + draws.unsqueeze(0)).flatten(0, 1))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError("the model must return logits [B, K]")
        if logits.shape[0] != x.shape[0] * size:
            raise ValueError(f"expected logits [{x.shape[0] * size}, K], got {tuple(logits.shape)}")
        log_p = F.log_softmax(logits, dim=1).view(x.shape[0], size, -1)
        return torch.logsumexp(log_p, dim=1)
