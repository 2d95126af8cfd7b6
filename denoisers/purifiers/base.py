"""What every purifier shares: the registry, the gradient modes, the purified classifier.

A purifier is an empirical defense (no certificate): it changes the input (pixel
purifiers: LGAP, ZeroPur, CMAP) or the classifier's image embedding (latent purifiers:
CLIPure) before the classifier decides. `PURIFIERS.build(name, classifier=...,
gradient=..., **hyperparameters)` returns a *purified model*, a base classifier like
`DenoiseAndClassify`: an `nn.Module` from [B, C, H, W] in [0, 1] to logits [B, K], with

- `classifier`: the undefended classifier it wraps (what a preprocessor-blind attack sees);
- `gradient`: how its backward pass is computed, one of `GRADIENTS` (below);
- `random`: whether its output depends on its randomness (then attack it with EOT);
- `generator`: the `torch.Generator` its randomness comes from (the attack runner sets
  one per example, derived from (seed, i)); a fresh unseeded one when None;
- `settings`: every hyperparameter that decides an output, with `gradient`, for the
  result file's JSON (values the paper does not give are marked as our choice in the
  builder's docstring and the docs).

Gradient modes (`attack --gradient`):

- "exact": autograd through everything; a defense that itself takes gradients in an
  inner loop builds them with `create_graph=True`, so the attacker gets second order.
- "official": what the authors' released code back-propagates (e.g. a detached update
  direction); the builder's docstring says what that is for its purifier.
- "bpda": the forward pass unchanged, the backward pass of the classifier alone at the
  purified point, as if the purification were the identity (Athalye et al. 2018).
- "blind" is not a mode of the model: the attack is run on `classifier` and the result
  evaluated on the purified model (what most of these papers report).

An inner optimization loop runs under `torch.enable_grad()` (the BPDA forward and the
evaluation run under no_grad) and detaches its iterates unless the mode is "exact".
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from classifiers.registry import Registry
from smoothing.attacks import BPDA

PURIFIERS = Registry("purifier")

GRADIENTS: tuple[str, ...] = ("exact", "official", "bpda")
ATTACK_GRADIENTS: tuple[str, ...] = (*GRADIENTS, "blind")


class PixelPurifier(Protocol):
    """`purify(x, generator) -> x'`: [B, C, H, W] in [0, 1] to the same shape, in [0, 1]."""

    random: bool

    def purify(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor: ...


def check_gradient(gradient: str, supported: tuple[str, ...] = GRADIENTS) -> str:
    if gradient not in supported:
        raise ValueError(f"unknown gradient mode {gradient!r}; use one of {', '.join(supported)}")
    return gradient


class PurifiedClassifier(nn.Module):
    """classifier(purifier.purify(x)): a pixel purifier in front of a base classifier.

    `gradient` "exact" and "official" differentiate through `purify` as the purifier
    builds it (it reads `gradient` itself); "bpda" replaces its backward by the identity.
    """

    def __init__(
        self,
        purifier: nn.Module,
        classifier: nn.Module,
        gradient: str = "exact",
        settings: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier
        self.gradient = check_gradient(gradient)
        self.random = bool(getattr(purifier, "random", False))
        self.generator: torch.Generator | None = None
        self.settings = {**(settings or {}), "gradient": self.gradient}

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.purifier.purify(x, self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient == "bpda":
            return self.classifier(BPDA(_Purify(self))(x))
        return self.classifier(self.purify(x))


class _Purify(nn.Module):
    """The purification step of a `PurifiedClassifier` as a module (for `BPDA`)."""

    def __init__(self, purified: PurifiedClassifier):
        super().__init__()
        self._purified = [purified]  # a list: not registered as a submodule twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._purified[0].purify(x)
