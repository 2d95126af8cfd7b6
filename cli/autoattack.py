"""AutoAttack (Croce & Hein, ICML 2020) through the `pyautoattack` package: an optional extra.

`pyautoattack` packages fra31/auto-attack's attack code unchanged (APGD, FAB, Square);
only its `AutoAttack` front end was refactored (keyword arguments, `logging`). We call
that front end and do not reimplement any attack. What this adapter adds:

- names: "apgd-ce" and "apgd-t" (one attack of the standard version, with that version's
  settings, as the library's `run_standard_evaluation_individual` runs it),
  "autoattack" (version "standard": APGD-CE, APGD-T, FAB-T, Square) and
  "autoattack-rand" (version "rand": APGD-CE and APGD-DLR with EOT over 20 draws);
- seeding: the library reseeds torch's global RNG (`torch.random.manual_seed`) inside
  every attack. We run it inside `torch.random.fork_rng` seeded with the caller's seed,
  so that a call's result depends only on (model, x, y, settings, seed) and the
  caller's global RNG state is the same afterwards;
- the threat model: what the library returns is checked against the L2/Linf ball and
  [0, 1]; float32 rounding of its projection is projected away, anything beyond that is
  an error, never returned;
- quiet: the library's checks log warnings on the "auto-attack" logger; they are
  collected during the call and printed once each with `tqdm.write`, so a progress bar
  is not broken.

The wheel also ships `pyautoattack/examples/model_test.pt`, a pickled CIFAR-10 ResNet
checkpoint for the library's own example script (which unpickles it with `torch.load`),
and a Keras weight file: we never import the examples nor load those files.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import numbers
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cli.errors import CommandError
from smoothing.attacks import NORMS, ThreatModel

LIBRARY = "pyautoattack"
INSTALL_HINT = "pip install 'robustify[autoattack]'"
ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "autoattack", "autoattack-rand")

# name -> (the library's version, the attacks of it that run; None: all of the version's)
_RUNS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "apgd-ce": ("standard", ("apgd-ce",)),
    "apgd-t": ("standard", ("apgd-t",)),
    "autoattack": ("standard", None),
    "autoattack-rand": ("rand", None),
}
_LIBRARY_NORMS = {"l2": "L2", "linf": "Linf"}

# The library's settings for the L2 and Linf versions (pyautoattack 0.2.0,
# AutoAttack.__init__ and _set_version, identical to fra31/auto-attack's). Written here
# to describe a run for the result file; `_build` checks them against the objects it
# builds, so a library release that changes them fails loudly instead of being misfiled.
_VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
_DEFAULT_ITERATIONS = 100  # APGD's and FAB's n_iter
_DEFAULT_TARGETS = 9  # APGD-T's and FAB-T's n_target_classes
_SQUARE_QUERIES = 5000
_EOT_ITERATIONS = {"standard": 1, "rand": 20}
_DEFAULT_RESTARTS = 1  # APGD-CE/DLR and APGD-T (per target class) in both versions
_FIXED_RESTARTS = {"fab-t": 1, "square": 1}  # the library resets FAB-T's to 1 before it runs

# The fewest classes each attack's loss can be computed with: DLR reads the third
# largest logit, targeted DLR the fourth (the library indexes out of range below that).
_FEWEST_CLASSES = {"apgd-ce": 2, "apgd-dlr": 3, "apgd-t": 4, "fab-t": 2, "square": 2}

# Relative excess over eps that counts as float32 rounding of the library's projection
# (it works in float32: x + delta, clamped, then compared to x). Beyond it: an error.
_ROUNDING = 1e-4
# What the returned x_adv is guaranteed to satisfy, in float64: the result files'
# contract ("inside the threat model when norm <= eps * (1 + 1e-5)").
_GUARANTEE = 1e-5

_seen_messages: set[str] = set()


def require_autoattack() -> None:
    """Raise `CommandError` (exit status 2) with an install hint if pyautoattack is missing."""
    try:
        import pyautoattack  # noqa: F401
    except ImportError as error:
        raise CommandError(
            f"AutoAttack needs the optional package {LIBRARY} ({error}); install it with: "
            f"{INSTALL_HINT}"
        ) from None


def library_version() -> str:
    """The installed pyautoattack's version (after `require_autoattack`)."""
    require_autoattack()
    return importlib.metadata.version(LIBRARY)


def autoattack_settings(
    attack: str, steps: int | None, restarts: int | None, *, num_classes: int | None = None
) -> dict[str, Any]:
    """What `autoattack(..., attack, steps=steps, restarts=restarts)` runs, for the JSON.

    `steps` sets the iterations of the gradient attacks (APGD-CE, APGD-DLR, APGD-T, FAB-T;
    not Square's 5000 queries), `restarts` those of APGD-CE, APGD-DLR and APGD-T (per
    target class); None keeps the library's values for the version. `num_classes`, when
    known, gives the exact number of target classes (9, or K - 1 for K < 10 classes).
    """
    _check_name(attack)
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    if num_classes is not None:
        _check_count("num_classes", num_classes)
    version, subset = _RUNS[attack]
    attacks = list(subset or _VERSION_ATTACKS[version])
    gradient_restarts = _DEFAULT_RESTARTS if restarts is None else restarts
    settings: dict[str, Any] = {
        "library": LIBRARY,
        "library_version": library_version(),
        "version": version,
        "attacks_to_run": attacks,
        "n_iter": _DEFAULT_ITERATIONS if steps is None else steps,
        "n_restarts": {
            name: _FIXED_RESTARTS.get(name, gradient_restarts) for name in attacks
        },
        "eot_iter": _EOT_ITERATIONS[version],
    }
    if "apgd-t" in attacks or "fab-t" in attacks:
        settings["n_target_classes"] = _targets(num_classes)
    if "square" in attacks:
        settings["n_queries"] = _SQUARE_QUERIES
    return settings


def check_autoattack_classes(attack: str, num_classes: int) -> None:
    """Refuse (exit status 2) a model with too few classes for the attack's losses."""
    _check_name(attack)
    version, subset = _RUNS[attack]
    for name in subset or _VERSION_ATTACKS[version]:
        fewest = _FEWEST_CLASSES[name]
        if num_classes < fewest:
            raise CommandError(
                f"{attack} runs {name.upper()}, whose loss needs at least {fewest} classes; "
                f"the model has {num_classes} (apgd-ce works from 2)"
            )


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    norm: str,
    eps: float,
    seed: int,
    steps: int | None = None,
    restarts: int | None = None,
) -> torch.Tensor:
    """Run AutoAttack (or one of its attacks) on `model`: x_adv, shaped and typed like x.

    x is [B, C, H, W] in [0, 1], y [B] its labels; `attack` one of `ATTACKS`, `norm`
    "l2" or "linf". For each example the library returns the first adversarial example
    it finds (the model's argmax differs from y), or x itself where it finds none (and
    where the model already misclassifies x). The result lies in [0, 1] and within eps
    of x up to a relative 1e-5 (float32 rounding), or this raises.

    The library reseeds torch's global RNG; it runs here inside `torch.random.fork_rng`
    seeded with `seed` (0 <= seed < 2^64), so the result depends only on (model, x, y,
    settings, seed) and the caller's RNG state is unchanged. Pass one example with its
    own seed to make each example's result independent of the others. A defense drawing
    from its own `torch.Generator` must be reseeded by the caller. The library computes
    in float32.
    """
    require_autoattack()
    _check_name(attack)
    if norm not in NORMS:
        raise CommandError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    try:
        threat = ThreatModel(norm, eps)
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    _check_seed(seed)
    _check_batch(x, y)
    library_x = x.detach().float()
    with _seeded_global_rng(seed), _library_messages():
        num_classes = _probe_classes(model, library_x)
        check_autoattack_classes(attack, num_classes)
        _check_image_size(attack, norm, x)
        adversary = _build(model, attack, norm, float(eps), seed, steps, restarts, num_classes,
                           library_x.device)
        x_adv, _ = adversary.run_standard_evaluation(
            library_x, y.detach().to(library_x.device), batch_size=x.shape[0]
        )
    x_adv = x_adv.detach().to(device=x.device, dtype=x.dtype)  # float32 -> x's dtype
    return _inside_threat_model(threat, x_adv, x.detach())


def _build(
    model: nn.Module,
    attack: str,
    norm: str,
    eps: float,
    seed: int,
    steps: int | None,
    restarts: int | None,
    num_classes: int,
    device: torch.device,
):
    """The library's AutoAttack object, set up as `autoattack_settings` describes."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack

    version, subset = _RUNS[attack]
    adversary = AutoAttack(model, device=device, eps=eps, norm=_LIBRARY_NORMS[norm], seed=seed,
                           version=version)
    adversary.verbose = False  # its progress lines; the checks' warnings are collected
    _check_library_defaults(adversary, version)
    if subset is not None:
        # as the library's own run_standard_evaluation_individual restricts a version
        adversary.attacks_to_run = list(subset)
    targets = _targets(num_classes)
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_target_classes = targets
    if steps is not None:
        # APGD derives its step-size checkpoints from n_iter in its constructor: take
        # them from a library object built with n_iter=steps rather than recomputing.
        schedule = APGDAttack(model, n_iter=steps, norm=_LIBRARY_NORMS[norm], eps=eps)
        for apgd in (adversary.apgd, adversary.apgd_targeted):
            for name in ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr"):
                setattr(apgd, name, getattr(schedule, name))
        adversary.fab.n_iter = steps
    if restarts is not None:
        adversary.apgd.n_restarts = restarts
        adversary.apgd_targeted.n_restarts = restarts
    return adversary


def _check_library_defaults(adversary, version: str) -> None:
    """Fail loudly if this library release does not set up a version as described."""
    found = {
        "attacks_to_run": tuple(adversary.attacks_to_run),
        "n_iter": (adversary.apgd.n_iter, adversary.apgd_targeted.n_iter, adversary.fab.n_iter),
        "restarts": (adversary.apgd.n_restarts, adversary.apgd_targeted.n_restarts),
        "eot_iter": adversary.apgd.eot_iter,
        "n_queries": adversary.square.n_queries,
    }
    expected = {
        "attacks_to_run": _VERSION_ATTACKS[version],
        "n_iter": (_DEFAULT_ITERATIONS,) * 3,
        "restarts": (_DEFAULT_RESTARTS,) * 2,
        "eot_iter": _EOT_ITERATIONS[version],
        "n_queries": _SQUARE_QUERIES,
    }
    if found != expected:
        raise RuntimeError(
            f"{LIBRARY} {library_version()} sets up version {version!r} as {found}, not as "
            f"this adapter records it ({expected}); pin the version in constraints.txt"
        )


def _targets(num_classes: int | None) -> int:
    # a target is any class but the true one: at most K - 1 of them
    return _DEFAULT_TARGETS if num_classes is None else min(_DEFAULT_TARGETS, num_classes - 1)


@contextlib.contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    # The library calls torch.random.manual_seed, which seeds the CPU generator and every
    # CUDA device's: fork (and afterwards restore) all of them.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # also what a random model draws before the first attack
        yield


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _library_messages() -> Iterator[None]:
    """Collect the library's warnings (its checks: "randomized defense", "dynamic
    defense", too many target classes, zero gradients) and print each once per process
    above the progress bar, instead of Python's last-resort handler writing into it."""
    logger = logging.getLogger("auto-attack")
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        from tqdm.auto import tqdm

        for message in handler.messages:
            if message not in _seen_messages:
                _seen_messages.add(message)
                tqdm.write(f"AutoAttack ({LIBRARY}): {message}", file=sys.stderr)


def _probe_classes(model: nn.Module, x: torch.Tensor) -> int:
    """K, the number of logits; refuses a model the gradient attacks cannot differentiate."""
    with torch.enable_grad():
        probe = x.clone().requires_grad_(True)
        logits = model(probe)
        if (not isinstance(logits, torch.Tensor) or logits.dim() != 2
                or logits.shape[0] != x.shape[0]):
            shape = (tuple(logits.shape) if isinstance(logits, torch.Tensor)
                     else type(logits).__name__)
            raise CommandError(f"the model must return logits [{x.shape[0]}, K], got {shape}")
        gradient = None
        if logits.requires_grad:
            try:
                (gradient,) = torch.autograd.grad(logits.sum(), probe, allow_unused=True)
            except RuntimeError:  # e.g. a view of the input taken under no_grad
                gradient = None
    if gradient is None:
        raise CommandError(
            "AutoAttack's gradient attacks need input gradients, but the model's output does "
            "not require grad (inference mode, no_grad or detach inside it?); wrap a "
            "non-differentiable defense in BPDA"
        )
    return int(logits.shape[1])


def _inside_threat_model(threat: ThreatModel, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x_adv in the threat model around x: rounding excess projected away, more refused."""
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"{LIBRARY} returned a non-finite or misshapen batch")
    x_adv64, x64 = x_adv.double(), x.double()
    eps = threat.eps
    worst = float(threat.distance(x_adv64, x64).max())
    outside_box = max(float((-x_adv64).max()), float((x_adv64 - 1).max()), 0.0)
    if worst > eps * (1 + _ROUNDING) or outside_box > eps * _ROUNDING:
        raise RuntimeError(
            f"{LIBRARY} returned a perturbation of {threat.norm} norm {worst:.8g} (eps "
            f"{eps:.8g}) or a pixel {outside_box:.3g} outside [0, 1]: beyond float rounding; "
            "not returning it"
        )
    if worst > eps or outside_box > 0:
        x_adv = threat.project(x_adv64, x64).to(x.dtype)
    final = float(threat.distance(x_adv.double(), x64).max())
    if final > eps * (1 + _GUARANTEE) or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"projection left a perturbation of norm {final:.8g} > eps {eps:.8g}")
    return x_adv


def _check_image_size(attack: str, norm: str, x: torch.Tensor) -> None:
    # Square's L2 initialisation tiles the image with squares of side h // 5
    version, subset = _RUNS[attack]
    runs_square = "square" in (subset or _VERSION_ATTACKS[version])
    if runs_square and norm == "l2" and min(x.shape[2:]) < 5:
        raise CommandError(
            f"{attack} runs Square, whose L2 version needs images of at least 5x5 pixels; "
            f"got {x.shape[2]}x{x.shape[3]} (apgd-ce and apgd-t work on any size)"
        )


def _check_name(attack: str) -> None:
    if attack not in _RUNS:
        raise CommandError(f"unknown AutoAttack attack {attack!r}; expected one of "
                           f"{', '.join(ATTACKS)}")


def _check_count(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CommandError(f"{name} must be an integer >= 1, got {value!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise CommandError(f"seed must be an integer in [0, 2^64), got {seed!r}")


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise CommandError("x must be a float batch [B, C, H, W]")
    if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
        raise CommandError("x must lie in [0, 1] (and be finite)")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
        raise CommandError(f"y must be an integer tensor of shape [{x.shape[0]}]")


__all__ = [
    "ATTACKS",
    "INSTALL_HINT",
    "autoattack",
    "autoattack_settings",
    "check_autoattack_classes",
    "library_version",
    "require_autoattack",
]
