"""ZeroPur (seed 002, Liu et al.): Guided Shift, then Adaptive Projection, by the classifier.

Training-free: the only network is the classifier being defended. Both stages are
signed-gradient loops inside the Linf ball of radius `eps` (eps_pfy) around the input x,
intersected with [0, 1] (Alg. 1-2, lines "Clip"; `smoothing.attacks.ThreatModel`'s
projection):

- Guided Shift (Alg. 1, Eq. 11-14): x_g <- x_g + eta_1 sgn(grad d(f(x_g), f(blur(x_g)))),
  d the cosine similarity (Eq. 11) between the embedding of x_g and of its blurred copy;
  the blurred copy is a fixed target at each step (detached, as in the authors' code).
- Adaptive Projection (Alg. 2, Eq. 15-20): from x_p = x, descend
  L = lambda_1 / |S| sum_{l in S} -(f_l(x_g) - f_l(x)) . (f_l(x_p) - f_l(x))
      + lambda_2 ||phi(x_p) - phi(x)||_2
  by signed steps of eta_2 = eps / T_p; phi concatenates the channel-normalized
  activations of the perceptual layers, each divided by sqrt(h w) (Eq. 20, LPIPS with
  the classifier's own features).

Layers are named as in `classifier.named_modules()` and read with forward hooks: the
embedding f (Guided Shift), the feature layers S and the perceptual layers (Adaptive
Projection). For the bundled digits CNN (`classifiers.digits.DigitsCNN`) the names
default to `DIGITS_DEFAULTS` (with lambda1 1.0).

What an attacker differentiates (`gradient`):

- "exact": autograd through both loops, the inner gradients built with
  `create_graph=True`. sgn() has derivative zero wherever it is defined, so every path
  through an update direction (the blur, the embeddings, the layer features, the
  perceptual term, the momentum) contributes exactly zero; what remains is the chain of
  iterates and projections. The output is x_p, which starts at x and moves by
  +-eta_2 per step, clipped to [max(x - eps, 0), min(x + eps, 1)]: its Jacobian is
  diagonal with entries 0 or 1. A coordinate has derivative 1 unless it was clipped to
  0 or 1 by the box (derivative 0) and not clipped to x +- eps afterwards (derivative
  1 again): the identity with the box-pinned pixels masked out. Guided Shift does not
  appear in it at all (x_g enters only inside sgn()). Away from the points where a sign
  or a clip switches (a null set) this is the true derivative; across them the
  purifier is discontinuous, which no gradient sees.
- "official": the authors' released code (github.com/erhul/ZeroPur, `zeropur.py`)
  updates both loops' iterates under `torch.no_grad()` and blurs through PIL, so nothing
  back-propagates through the purifier; their adaptive attack approximates its
  gradient by the identity (BPDA, seed 002 App. A.3). "official" is therefore the
  identity backward at the purified point, the same gradient as "bpda".
- "bpda": the identity backward (handled by `PurifiedClassifier`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from denoisers.purifiers.base import PurifiedClassifier, check_gradient
from smoothing.attacks import BPDA, ThreatModel
from smoothing.core import _generator_for

BLURS: tuple[str, ...] = ("median", "gaussian")

# Defaults for `classifiers.digits.DigitsCNN` (our choice). Layers by analogy with the
# authors' ResNet-18 setup: the features before the last linear layer as the embedding,
# the outputs of the network's stages for the projection and the perceptual term; the
# digits CNN has two conv stages, whose ReLU outputs (16x8x8, 32x4x4) play layer3/layer4's
# part, and both make up phi as all four stages do for ResNet-18. lambda1: with the
# authors' 1e-4 the projection term is negligible beside the perceptual one on these small
# feature maps and Adaptive Projection moves x_p by two steps at most; 1.0 was the
# smallest of {1e-4, 1e-2, 1, 100} with the best blind PGD-L2 (eps 0.5) accuracy on 200
# images of the *train* split (docs/purifiers/zeropur.md).
DIGITS_DEFAULTS: dict[str, Any] = {
    "embedding_layer": "head.2",
    "feature_layers": ("features.1", "features.4"),
    "perceptual_layers": ("features.1", "features.4"),
    "lambda1": 1.0,
}

# Added under the square root of the perceptual distance: ||v|| has no second derivative
# at v = 0, which is where Adaptive Projection starts (x_p = x), and the exact mode builds
# second-order graphs through it (NaN there otherwise). Its effect on the value is
# below 1e-6 (our choice).
_PERCEPTUAL_DELTA = 1e-12
# Channel-normalization guard of the perceptual features (the authors' LPIPS code: 1e-10).
_CHANNEL_NORM_EPS = 1e-10


def median_blur(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """The size x size median of each pixel's neighbourhood, per channel (reflect padding).

    Written by hand: torchvision has no median filter and kornia would be a new
    dependency for these lines. Differentiable: the gradient reaches the selected pixel.
    """
    pad = size // 2
    batch, channels, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    windows = F.unfold(padded.flatten(0, 1).unsqueeze(1), kernel_size=size)  # [BC, k^2, HW]
    return windows.median(dim=1).values.view(batch, channels, height, width)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """torchvision's Gaussian blur (reflect padding); kernel 2 ceil(3 sigma) + 1 by default."""
    from torchvision.transforms.v2.functional import gaussian_blur as blur

    size = kernel_size if kernel_size is not None else 2 * math.ceil(3 * sigma) + 1
    if size // 2 >= min(x.shape[-2:]):
        raise ValueError(
            f"a Gaussian blur of sigma {sigma} (kernel {size}) does not fit a "
            f"{x.shape[-2]}x{x.shape[-1]} image (reflect padding); pass a smaller "
            "gaussian_sigma or blur='median'"
        )
    return blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


class _LayerTaps:
    """Forward hooks on named modules of a classifier, active only inside `capture()`."""

    def __init__(self, classifier: nn.Module, names: Sequence[str]):
        modules = dict(classifier.named_modules())
        unknown = [name for name in names if name not in modules]
        if unknown:
            available = ", ".join(repr(name) for name in modules if name)
            raise ValueError(
                f"the classifier has no module named {', '.join(map(repr, unknown))}; "
                f"its modules are: {available}"
            )
        self.classifier = classifier
        self.modules = {name: modules[name] for name in dict.fromkeys(names)}

    @contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        outputs: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(module: nn.Module, inputs: Any, output: Any) -> None:
                if name in outputs:
                    raise ValueError(
                        f"module {name!r} runs more than once in one forward pass of the "
                        "classifier, so its output is ambiguous; name a module that runs "
                        "once (e.g. the block that contains it)"
                    )
                if not isinstance(output, torch.Tensor):
                    raise ValueError(
                        f"module {name!r} returns {type(output).__name__}, not a tensor"
                    )
                # a clone: a later in-place op (ReLU(inplace=True)) must not change it
                outputs[name] = output.clone()

            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in self.modules.items()]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hooked outputs of one forward pass of the classifier on x."""
        with self.capture() as outputs:
            self.classifier(x)
        missing = [name for name in self.modules if name not in outputs]
        if missing:
            raise ValueError(
                f"module(s) {', '.join(map(repr, missing))} did not run in the classifier's "
                "forward pass; name modules on its path from input to logits"
            )
        return outputs


def _cosine(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cos(z, target) per row (Eq. 11), computed as 1 - ||u - v||^2 / 2 of the unit vectors.

    The same function as the textbook quotient, but its gradient is exactly zero where
    the two unit vectors are equal (x equal to its blurred copy): the quotient's
    gradient leaves round-off there, and sgn() turns round-off into full steps.
    """
    u, v = F.normalize(z, dim=1), F.normalize(target, dim=1)
    return 1 - (u - v).pow(2).sum(dim=1) / 2


def _perceptual_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """phi (Eq. 20): channel-normalized activations / sqrt(h w), concatenated: [B, D]."""
    parts = []
    for feature in features:
        if feature.dim() == 2:  # a vector layer is a 1x1 map
            feature = feature[:, :, None, None]
        norm = feature.pow(2).sum(dim=1, keepdim=True).sqrt() + _CHANNEL_NORM_EPS
        spatial = math.sqrt(feature[0, 0].numel())
        parts.append((feature / (norm * spatial)).flatten(1))
    return torch.cat(parts, dim=1)


class ZeroPurPurifier(nn.Module):
    """ZeroPur's two stages as a pixel purifier: `purify(x, generator) -> x_p` in [0, 1].

    See the module docstring for the algorithm and `build` for the hyperparameters.
    Examples are purified independently (each one's objective is a sum over examples),
    so the classifier should be in eval mode.
    """

    def __init__(
        self,
        classifier: nn.Module,
        *,
        embedding_layer: str,
        feature_layers: Sequence[str],
        perceptual_layers: Sequence[str],
        eps: float,
        gs_steps: int,
        gs_step_size: float,
        gs_momentum: float,
        ap_steps: int,
        lambda1: float,
        lambda2: float,
        blur: str,
        median_size: int,
        gaussian_sigma: float,
        random_start: bool,
        gradient: str,
    ):
        super().__init__()
        self.classifier = classifier
        self.embedding_layer = embedding_layer
        self.feature_layers = tuple(feature_layers)
        self.perceptual_layers = tuple(perceptual_layers)
        self.threat = ThreatModel("linf", eps)
        self.gs_steps = gs_steps
        self.gs_step_size = gs_step_size
        self.gs_momentum = gs_momentum
        self.ap_steps = ap_steps
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.blur_name = blur
        self.median_size = median_size
        self.gaussian_sigma = gaussian_sigma
        self.random = random_start
        self.gradient = check_gradient(gradient)
        self._embedding = _LayerTaps(classifier, [embedding_layer])
        self._layers = _LayerTaps(classifier, [*self.feature_layers, *self.perceptual_layers])

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur_name == "median":
            return median_blur(x, self.median_size)
        return gaussian_blur(x, self.gaussian_sigma)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the embedding layer's output, flattened: [B, D]."""
        return self._embedding(x)[self.embedding_layer].flatten(1)

    def alignment(self, x: torch.Tensor) -> torch.Tensor:
        """d(f(x), f(blur(x))) of Eq. 11 for each example: [B] (what Guided Shift raises)."""
        return _cosine(self.embed(x), self.embed(self.blur(x)))

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_images(x)
        if self.gradient == "official":
            # the authors' code back-propagates nothing through the purifier; their
            # adaptive attack takes the identity (BPDA): forward unchanged, backward identity
            return BPDA(_Run(self, generator))(x)
        # under no_grad (evaluation) nobody differentiates: skip the second-order graphs,
        # which do not change the forward values
        exact = self.gradient == "exact" and torch.is_grad_enabled()
        return self._purify(x, generator, exact=exact)

    def _purify(
        self, x: torch.Tensor, generator: torch.Generator | None, exact: bool
    ) -> torch.Tensor:
        with torch.enable_grad():  # also under no_grad (evaluation, BPDA's forward)
            x_g = self.guided_shift(x, generator, exact=exact)
            if self.ap_steps == 0:
                return x_g
            return self.adaptive_projection(x, x_g, exact=exact)

    def guided_shift(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, exact: bool = False
    ) -> torch.Tensor:
        """Alg. 1: gs_steps signed ascent steps of the alignment, in the eps ball around x."""
        if not exact:
            x = x.detach()
        if self.random:  # Alg. 1 line 1 (the authors' code: uniform in the ball, `rand`)
            x_g = self.threat.random_start(x.detach(), _generator_for(x, generator))
            if exact:  # the same offset, carried along with x
                x_g = x + (x_g - x).detach()
        else:
            x_g = x.clone()
        momentum = torch.zeros_like(x)
        with torch.enable_grad():
            for _ in range(self.gs_steps):
                current = x_g if exact else x_g.detach()
                if not current.requires_grad:  # a leaf: the input itself, or detached
                    current.requires_grad_(True)
                with torch.no_grad():
                    target = self.embed(self.blur(current))  # fixed target (authors' code)
                alignment = _cosine(self.embed(current), target)
                (grad,) = torch.autograd.grad(alignment.sum(), current, create_graph=exact)
                if self.gs_momentum > 0:  # the authors' code: L1-normalized, accumulated
                    l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12)
                    grad = grad / l1.view(-1, *([1] * (x.dim() - 1))) + self.gs_momentum * momentum
                    momentum = grad if exact else grad.detach()
                step = current + self.gs_step_size * grad.sign()
                x_g = self.threat.project(step, x)
                if not exact:
                    x_g = x_g.detach()
        return x_g

    def adaptive_projection(
        self, x: torch.Tensor, x_g: torch.Tensor, *, exact: bool = False
    ) -> torch.Tensor:
        """Alg. 2: ap_steps signed descent steps of L (Eq. 15-20) from x, step eps / T_p."""
        if not exact:
            x, x_g = x.detach(), x_g.detach()
        step_size = self.threat.eps / self.ap_steps
        with torch.set_grad_enabled(exact):  # constants of the objective
            start = self._layers(x)
            guided = self._layers(x_g)
            phi_start = _perceptual_features([start[n] for n in self.perceptual_layers])
            directions = {n: (guided[n] - start[n]).flatten(1) for n in self.feature_layers}
        x_p = x.clone()
        with torch.enable_grad():
            for _ in range(self.ap_steps):
                current = x_p if exact else x_p.detach()
                if not current.requires_grad:  # a leaf: the input itself, or detached
                    current.requires_grad_(True)
                loss = self.objective(current, start, directions, phi_start)
                (grad,) = torch.autograd.grad(loss.sum(), current, create_graph=exact)
                x_p = self.threat.project(current - step_size * grad.sign(), x)
                if not exact:
                    x_p = x_p.detach()
        return x_p

    def objective(
        self,
        x_p: torch.Tensor,
        start: dict[str, torch.Tensor],
        directions: dict[str, torch.Tensor],
        phi_start: torch.Tensor,
    ) -> torch.Tensor:
        """Alg. 2 line 9, for each example: [B]. Descending it maximizes Eq. 15."""
        current = self._layers(x_p)
        projection = sum(
            (directions[n] * (current[n] - start[n]).flatten(1)).sum(dim=1)
            for n in self.feature_layers
        )
        phi = _perceptual_features([current[n] for n in self.perceptual_layers])
        distance = ((phi - phi_start).pow(2).sum(dim=1) + _PERCEPTUAL_DELTA).sqrt()
        return -self.lambda1 / len(self.feature_layers) * projection + self.lambda2 * distance


class _Run(nn.Module):
    """The purification without a graph (for the "official" mode's identity backward)."""

    def __init__(self, purifier: ZeroPurPurifier, generator: torch.Generator | None):
        super().__init__()
        self._purifier = [purifier]  # a list: not registered as a submodule
        self._generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._purifier[0]._purify(x, self._generator, exact=False)


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("ZeroPur purifies a float batch [B, C, H, W]")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("ZeroPur's input must lie in [0, 1] (and be finite)")


def _positive_number(name: str, value: Any, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'}, got {value}")
    return float(value)


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    names = tuple(value) if isinstance(value, Sequence) else ()
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{name} must be one or more module names, got {value!r}")
    return names


def _default_blur(classifier: nn.Module) -> str:
    """The paper's rule (Sec. 4.2): median for a classifier trained without augmentation."""
    from classifiers.digits import DigitsCNN, weights_path

    if isinstance(classifier, DigitsCNN):
        files = [str(p) for p in getattr(classifier, "weight_files", [])]
        if files and files[0] == str(weights_path(0.0)):  # digits-clean: no augmentation
            return "median"
    return "gaussian"


def build(
    classifier: nn.Module,
    gradient: str = "exact",
    *,
    embedding_layer: str | None = None,
    feature_layers: Sequence[str] | str | None = None,
    perceptual_layers: Sequence[str] | str | None = None,
    eps: float = 10 / 255,
    gs_steps: int = 10,
    gs_step_size: float | None = None,
    gs_momentum: float = 0.0,
    ap_steps: int = 50,
    lambda1: float | None = None,
    lambda2: float = 1.0,
    blur: str | None = None,
    median_size: int = 3,
    gaussian_sigma: float = 1.2,
    random_start: bool = False,
    device: str | torch.device | None = None,
) -> PurifiedClassifier:
    """ZeroPur (seed 002) around `classifier`: a purified model (see `base`).

    The paper states the algorithm (Alg. 1-2) and the blurs but no step counts, step
    sizes, eps_pfy or weights; the defaults marked "authors' code" are those of the
    released implementation (github.com/erhul/ZeroPur, `zeropur.py`, CIFAR-10 runs).

    Args:
        classifier: the victim classifier, [B, C, H, W] in [0, 1] -> logits, in eval mode.
        gradient: "exact", "official" or "bpda" (module docstring).
        embedding_layer: module name (`classifier.named_modules()`) whose output is the
            embedding f of Guided Shift. For the digits CNN every default of
            `DIGITS_DEFAULTS` applies: embedding "head.2", S and phi "features.1",
            "features.4", lambda1 1.0.
        feature_layers: the layers S of Adaptive Projection.
        perceptual_layers: the layers of phi (Eq. 20); default: `feature_layers`.
            (The authors' ResNet-18: embedding = pooled layer4, S = layer3, layer4,
            phi = layer1..layer4, i.e. `model.avgpool`, `model.layer3`, ... for
            torchvision's ResNet behind `NormalizedClassifier`.)
        eps: eps_pfy, the Linf radius both stages stay within (authors' code: 10/255
            on CIFAR, 6/255 on ImageNet).
        gs_steps: T_g (authors' code: 10).
        gs_step_size: eta_1; default eps / gs_steps (authors' code).
        gs_momentum: 0 follows Alg. 1 (plain sign steps); the authors' code accumulates
            L1-normalized gradients with decay 1.0 before the sign.
        ap_steps: T_p; the step is eps / T_p (Alg. 2 line 2; authors' code: 50). 0 runs
            Guided Shift alone (the "GS" rows of Table 1).
        lambda1, lambda2: weights of Alg. 2 line 9 (authors' code: 1e-4 and 1, the
            defaults; it sums over S where the paper averages, i.e. its 1e-4 is
            lambda1 = 1e-4 |S| here; our choice: the paper's form with the authors'
            numbers). Digits CNN: lambda1 1.0 (our choice, see `DIGITS_DEFAULTS`).
        blur: "median" (a size x size median, for classifiers trained without data
            augmentation, "vanilla" in Sec. 4.2) or "gaussian" (sigma `gaussian_sigma`,
            for classifiers trained with augmentation). Default: "median" for the
            digits CNN trained without noise (`digits-clean`), "gaussian" otherwise;
            pass it for any other vanilla classifier.
        median_size: the median window (paper: 3x3).
        gaussian_sigma: the Gaussian's sigma (paper: 1.2); kernel 2 ceil(3 sigma) + 1.
        random_start: Alg. 1 line 1's random start, uniform in the eps ball (the
            authors' code defaults to none: `rand=False`); True makes the purifier random.
        device: if given, the purified model is moved there.
    """
    if not isinstance(classifier, nn.Module):
        raise ValueError(
            f"ZeroPur wraps a torch.nn.Module classifier, got {type(classifier).__name__}"
        )
    check_gradient(gradient)
    layers = {
        "embedding_layer": embedding_layer,
        "feature_layers": feature_layers,
        "perceptual_layers": perceptual_layers,
        "lambda1": lambda1,
    }
    from classifiers.digits import DigitsCNN

    if isinstance(classifier, DigitsCNN):
        layers = {k: v if v is not None else DIGITS_DEFAULTS[k] for k, v in layers.items()}
    if layers["perceptual_layers"] is None:
        layers["perceptual_layers"] = layers["feature_layers"]
    if layers["embedding_layer"] is None or layers["feature_layers"] is None:
        available = ", ".join(repr(name) for name, _ in classifier.named_modules() if name)
        raise ValueError(
            "ZeroPur needs embedding_layer and feature_layers (module names) for a "
            f"{type(classifier).__name__}; its modules are: {available}"
        )
    if not isinstance(layers["embedding_layer"], str):
        raise ValueError(f"embedding_layer must be a module name, got {embedding_layer!r}")
    feature_names = _names("feature_layers", layers["feature_layers"])
    perceptual_names = _names("perceptual_layers", layers["perceptual_layers"])
    eps = _positive_number("eps", eps)
    gs_steps = _count("gs_steps", gs_steps, 1)
    ap_steps = _count("ap_steps", ap_steps, 0)
    gs_step_size = eps / gs_steps if gs_step_size is None else gs_step_size
    gs_step_size = _positive_number("gs_step_size", gs_step_size)
    gs_momentum = _positive_number("gs_momentum", gs_momentum, zero=True)
    lambda1 = 1e-4 if layers["lambda1"] is None else layers["lambda1"]  # authors' code
    lambda1 = _positive_number("lambda1", lambda1, zero=True)
    lambda2 = _positive_number("lambda2", lambda2, zero=True)
    blur = _default_blur(classifier) if blur is None else blur
    if blur not in BLURS:
        raise ValueError(f"unknown blur {blur!r}; use one of {', '.join(BLURS)}")
    median_size = _count("median_size", median_size, 3)
    if median_size % 2 == 0:
        raise ValueError(f"median_size must be odd, got {median_size}")
    gaussian_sigma = _positive_number("gaussian_sigma", gaussian_sigma)
    if not isinstance(random_start, bool):
        raise ValueError(f"random_start must be True or False, got {random_start!r}")

    purifier = ZeroPurPurifier(
        classifier,
        embedding_layer=layers["embedding_layer"],
        feature_layers=feature_names,
        perceptual_layers=perceptual_names,
        eps=eps,
        gs_steps=gs_steps,
        gs_step_size=gs_step_size,
        gs_momentum=gs_momentum,
        ap_steps=ap_steps,
        lambda1=lambda1,
        lambda2=lambda2,
        blur=blur,
        median_size=median_size,
        gaussian_sigma=gaussian_sigma,
        random_start=random_start,
        gradient=gradient,
    )
    settings = {
        "purifier": "zeropur",
        "embedding_layer": purifier.embedding_layer,
        "feature_layers": list(feature_names),
        "perceptual_layers": list(perceptual_names),
        "eps": eps,
        "norm": "linf",
        "gs_steps": gs_steps,
        "gs_step_size": gs_step_size,
        "gs_momentum": gs_momentum,
        "ap_steps": ap_steps,
        "ap_step_size": eps / ap_steps if ap_steps else None,
        "lambda1": lambda1,
        "lambda2": lambda2,
        "blur": blur,
        **({"median_size": median_size} if blur == "median" else {}),
        **({"gaussian_sigma": gaussian_sigma} if blur == "gaussian" else {}),
        "random_start": random_start,
        "official_gradient": "identity (BPDA): the authors' code updates under no_grad",
    }
    model = PurifiedClassifier(purifier, classifier, gradient=gradient, settings=settings)
    return model.to(device) if device is not None else model
