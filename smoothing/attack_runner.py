"""Attack every example of a dataset, one result row per example, resumable.

The `attack` command's loop, beside `smoothing.runner.run` and sharing its result writer
(`ResultFile`, mode "attack"), lock, seeding rule and progress bar. Model-agnostic: the
attacked model is any `torch.nn.Module` from [B, C, H, W] in [0, 1] to logits (a
classifier, `DenoiseAndClassify`, a purified model), the attack any callable
`attack(x [1, C, H, W], y [1], generator) -> x_adv`.

Each example i draws from its own streams (`example_seed(seed, i, stream)`): 0 the
decision on the clean input (so the clean columns equal `predict`'s row of the same
seed), 1 the attack (random start, SmoothAdv's noise, a library attack's seed), 2 PREDICT
on the attacked input (fresh noise: never the noise the attack optimized against), 3 the
randomness of a random defense (a model with a `generator` attribute gets a fresh
generator of stream 3 before the attack and before each evaluation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothing.attacks import SmoothedSoftClassifier, ThreatModel, draw_noise
from smoothing.core import NonFiniteOutputError, Smooth
from smoothing.runner import (
    STREAM_ADVERSARIAL,
    STREAM_ATTACK,
    STREAM_CLEAN,
    STREAM_DEFENSE,
    ForwardPassCounter,
    ResultFile,
    example_generator,
    run_rows,
)

# `attack(x [1, C, H, W], y [1], generator) -> x_adv [1, C, H, W]`
Attack = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
# `margin(x_adv, y, generator) -> [B]`: log p_y - max_{c != y} log p_c; < 0 means fooled
Margin = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]

# A perturbation is inside the threat model when its norm is <= eps * (1 + THREAT_TOLERANCE):
# the projection is exact in real numbers, its float32 result is not.
THREAT_TOLERANCE = 1e-5
NORM_DECIMALS = 6


class AttackOutsideThreatModelError(RuntimeError):
    """An attack returned a point outside its threat model or [0, 1]: a bug, no row written."""


@dataclass
class AttackSettings:
    """What an attack run needs beyond the model, the attack and the data.

    `threat` is the attack's threat model (None for no attack: x_adv must equal x).
    `n`, `alpha`, `batch_size` are PREDICT's when a `Smooth` decides; `autocast_dtype` is
    the precision of the base classifier's decision without one.
    """

    threat: ThreatModel | None
    seed: int = 0
    device: str = "cpu"
    n: int = 100
    alpha: float = 0.001
    batch_size: int = 1000
    autocast_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def ceil_norm(value: float) -> str:
    """`value` rounded UP to NORM_DECIMALS decimals (exactly: Decimal holds the float's
    value), so a check of the written norm against eps is conservative."""
    step = Decimal(1).scaleb(-NORM_DECIMALS)
    return str(Decimal(value).quantize(step, rounding=ROUND_CEILING))


def check_perturbation(
    x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel | None
) -> tuple[float, float]:
    """(L2, Linf) of x_adv - x in float64, after checking x_adv is a point of the threat
    model: shaped like x, finite, in [0, 1], norm <= eps * (1 + THREAT_TOLERANCE) (equal to x
    without a threat model). Raises AttackOutsideThreatModelError otherwise."""
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        shape = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise AttackOutsideThreatModelError(
            f"the attack returned {shape}, not a batch shaped like its input {tuple(x.shape)}"
        )
    if not torch.isfinite(x_adv).all():
        raise AttackOutsideThreatModelError("the attack returned NaN or inf")
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise AttackOutsideThreatModelError(
            f"the attack returned values in [{x_adv.min().item()}, {x_adv.max().item()}], "
            "outside [0, 1]"
        )
    delta = (x_adv.detach().double() - x.detach().double()).flatten()
    l2 = float(torch.linalg.vector_norm(delta, ord=2))
    linf = float(delta.abs().max()) if delta.numel() else 0.0
    if threat is None:
        if linf != 0:
            raise AttackOutsideThreatModelError("no attack was asked for, but the input changed")
        return l2, linf
    norm = l2 if threat.norm == "l2" else linf
    if not norm <= threat.eps * (1 + THREAT_TOLERANCE):
        raise AttackOutsideThreatModelError(
            f"the attack returned a perturbation of {threat.norm} norm {norm!r}, beyond "
            f"eps = {threat.eps!r}: a bug in the attack; no row was written"
        )
    return l2, linf


def with_restarts(attack: Attack, restarts: int, margin: Margin) -> Attack:
    """Run `attack` `restarts` times (each drawing on from the same generator) and keep the
    result of lowest `margin` (log p_y - max_{c != y} log p_c: the most confidently wrong,
    or the least confidently right); the earlier restart on ties. All restarts always run,
    so an example's cost does not depend on when one succeeds."""
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if restarts == 1:
        return attack

    def attack_with_restarts(x, y, generator):
        best, best_margin = None, None
        for _ in range(restarts):
            candidate = attack(x, y, generator)
            score = margin(candidate, y, generator)
            if best is None:
                best, best_margin = candidate, score
            else:
                better = _per_example(score < best_margin, candidate)
                best = torch.where(better, candidate, best)
                best_margin = torch.minimum(score, best_margin)
        return best

    return attack_with_restarts


def _per_example(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _margin_of(log_probabilities: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = log_probabilities.gather(1, y[:, None])[:, 0]
    others = log_probabilities.scatter(1, y[:, None], -math.inf)
    return true - others.max(dim=1).values


def base_margin(model: nn.Module) -> Margin:
    """The margin of the base classifier's softmax (the generator is not used)."""

    @torch.no_grad()
    def margin(x_adv, y, generator):
        return _margin_of(F.log_softmax(model(x_adv), dim=1), y)

    return margin


def smoothed_margin(model: nn.Module, sigma: float, m: int, chunk: int | None = None) -> Margin:
    """The margin of the smoothed soft classifier, on m fresh draws from the attack's
    generator: not the draws the attack optimized against (which would favour a restart
    that overfits them), and not PREDICT's."""

    @torch.no_grad()
    def margin(x_adv, y, generator):
        noise = draw_noise(x_adv[:1], m, sigma, generator)[0]
        return _margin_of(SmoothedSoftClassifier(model, noise, chunk)(x_adv), y)

    return margin


def run_attack(
    model: nn.Module,
    attack: Attack,
    dataset: Sequence[tuple[torch.Tensor, int]],
    indices: Sequence[int],
    results: ResultFile,
    settings: AttackSettings,
    smooth: Smooth | None = None,
    extra_record: dict[str, Any] | None = None,
    progress: bool = True,
    skip_errors: tuple[type[Exception], ...] = (),
) -> ResultFile:
    """Attack every example in `indices` not already in `results`, one row each.

    Without `smooth` the decision is the base classifier's argmax; with it, PREDICT of the
    smoothed classifier (`smooth.base_classifier` must be `model`), an abstention counting
    as not robust, and on the clean input scored by the base classifier (seed 004, App.
    A.3). Examples go one at a time: batching several is the throughput issue's job.
    """
    if results.mode != "attack":
        raise ValueError(f"results must be opened in mode 'attack', not {results.mode!r}")
    if smooth is not None and smooth.base_classifier is not model:
        raise ValueError("smooth must smooth the attacked model")
    model.eval()  # batch norm in train mode would couple the examples of a batch
    # Every forward pass of the model counts: the attack's steps, PREDICT's noisy copies,
    # the clean evaluations.
    with ForwardPassCounter(model) as counter:
        return run_rows(
            lambda index: _attack_example(model, attack, smooth, dataset, index, settings),
            indices, results, extra_record=extra_record, progress=progress,
            skip_errors=skip_errors, description="attack", accuracy_name="robust acc",
            forward_passes=lambda: counter.count,
        )


def _attack_example(
    model: nn.Module,
    attack: Attack,
    smooth: Smooth | None,
    dataset: Sequence[tuple[torch.Tensor, int]],
    index: int,
    settings: AttackSettings,
) -> dict[str, Any]:
    image, label = dataset[index]
    label = int(label)
    x = image.to(settings.device).unsqueeze(0)
    y = torch.tensor([label], device=settings.device)
    started = time.perf_counter()
    clean_predict, clean_scored = _decide(model, smooth, x, index, settings, STREAM_CLEAN)
    _seed_defense(model, index, settings)
    x_adv = attack(x, y, example_generator(settings.seed, index, settings.device, STREAM_ATTACK))
    l2, linf = check_perturbation(x_adv, x, settings.threat)
    predict, _ = _decide(model, smooth, x_adv.detach(), index, settings, STREAM_ADVERSARIAL)
    elapsed = time.perf_counter() - started
    return {
        "idx": index, "label": label, "predict": predict, "correct": int(predict == label),
        "time": f"{elapsed:.3f}", "clean_predict": clean_predict,
        "clean_correct": int(clean_scored == label), "l2": ceil_norm(l2),
        "linf": ceil_norm(linf),
    }


def _seed_defense(model: nn.Module, index: int, settings: AttackSettings) -> None:
    """A fresh generator of stream 3 for a random defense, so that each of its uses (the
    attack, each evaluation) sees the same randomness whatever ran before it."""
    if hasattr(model, "generator"):
        model.generator = example_generator(
            settings.seed, index, settings.device, STREAM_DEFENSE
        )


def _decide(
    model: nn.Module,
    smooth: Smooth | None,
    x: torch.Tensor,
    index: int,
    settings: AttackSettings,
    stream: int,
) -> tuple[int, int]:
    """(decision, decision scored for clean accuracy) on x [1, C, H, W].

    With `smooth`: PREDICT on noise of `stream`; an abstention is scored by the base
    classifier's prediction (seed 004, App. A.3). Without: the base classifier's argmax.
    """
    _seed_defense(model, index, settings)
    if smooth is None:
        prediction = _base_prediction(model, x, settings.autocast_dtype)
        return prediction, prediction
    generator = example_generator(settings.seed, index, settings.device, stream)
    prediction = smooth.predict(x[0], settings.n, settings.alpha, settings.batch_size, generator)
    if prediction != Smooth.ABSTAIN:
        return prediction, prediction
    _seed_defense(model, index, settings)
    return prediction, smooth.base_predict(x[0])


# no_grad, not inference_mode: a purifier optimizes inside its forward pass (under
# enable_grad), which inference tensors would forbid.
@torch.no_grad()
def _base_prediction(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> int:
    if dtype is None:
        logits = model(x)
    else:
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"expected logits [1, K] from the model, got {shape}")
    if not torch.isfinite(logits).all():
        raise NonFiniteOutputError("the model returned NaN or inf")
    return int(logits.argmax(dim=1).item())
