"""The smoothed classifier g(x) = argmax_c P[f(x + delta) = c], delta ~ N(0, sigma^2 I).

Same public shape as Cohen et al.'s reference `core.Smooth`, so code written
against it ports by changing one import. Differences: randomness comes from an
explicit `torch.Generator`, the noise is drawn in float64 so that its tails are
Gaussian (`smoothing.noise`), counting stays on the device (one transfer per
call), and a non-finite output of the base classifier raises instead of being
counted as a vote.
"""

from __future__ import annotations

import contextlib
import math

import torch

from smoothing import stats
from smoothing.noise import gaussian_noise


class NonFiniteOutputError(RuntimeError):
    """The base classifier returned NaN or inf: its votes cannot be trusted."""


class Smooth:
    """A smoothed classifier around `base_classifier` ([B, C, H, W] in [0, 1] -> logits [B, K])."""

    ABSTAIN = stats.ABSTAIN

    def __init__(
        self,
        base_classifier: torch.nn.Module,
        num_classes: int,
        sigma: float,
        autocast_dtype: torch.dtype | None = None,
    ):
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        # Certified in eval mode: in train mode BatchNorm would normalize each noisy batch
        # by its own statistics (and overwrite the running ones), dropout would vote too.
        if isinstance(base_classifier, torch.nn.Module):
            base_classifier.eval()
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.autocast_dtype = autocast_dtype

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> tuple[int, float]:
        """CERTIFY: (class, L2 radius) holding with probability >= 1 - alpha, or (ABSTAIN, 0.0).

        n0 draws select the top class; n fresh draws bound its probability.
        """
        _check_counts(n0=n0, n=n, batch_size=batch_size)
        generator = _generator_for(x, generator)
        counts_selection = self.sample_counts(x, n0, batch_size, generator)
        counts_estimation = self.sample_counts(x, n, batch_size, generator)
        both = torch.stack([counts_selection, counts_estimation]).cpu().numpy()
        return stats.certify_from_counts(both[0], both[1], alpha, self.sigma)

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> int:
        """PREDICT: the top class if it beats the runner-up at level alpha, else ABSTAIN."""
        _check_counts(n=n, batch_size=batch_size)
        counts = self.sample_counts(x, n, batch_size, _generator_for(x, generator))
        return stats.predict_from_counts(counts.cpu().numpy(), alpha)

    @torch.inference_mode()
    def sample_counts(
        self, x: torch.Tensor, num: int, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Votes of the base classifier on `num` noisy copies of x: a [K] tensor on x's device."""
        _check_counts(num=num, batch_size=batch_size)
        _check_image(x)
        # Memory is bounded by the batch, not by num: each batch's votes are added into
        # a [K] tensor on the device and its finiteness folded into one flag, both read
        # once at the end (no host sync per batch, and few small ops, which matters for
        # models of microseconds). scatter_add_, not bincount: CUDA's bincount reads the
        # largest vote back to the host to size its output, a sync per batch.
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        ones = torch.ones(min(num, batch_size), dtype=torch.long, device=x.device)
        finite = torch.ones((), dtype=torch.bool, device=x.device)
        for start in range(0, num, batch_size):
            size = min(batch_size, num - start)
            # N(0, sigma^2 I) noise with Gaussian tails (smoothing.noise), then x added in
            # place: the input is never copied
            batch = gaussian_noise(
                (size, *x.shape), self.sigma, generator, dtype=x.dtype, device=x.device
            ).add_(x)
            logits = self._logits(batch)
            counts.scatter_add_(0, logits.argmax(dim=1), ones[:size])
            finite.logical_and_(torch.isfinite(logits).all())
        if not bool(finite):
            raise NonFiniteOutputError(
                "the base classifier returned NaN or inf under noise; refusing to count its votes"
            )
        return counts

    @torch.inference_mode()
    def guess(
        self, x: torch.Tensor, n0: int, batch_size: int, generator: torch.Generator
    ) -> tuple[int, int]:
        """CERTIFY's guess, the argmax of the votes on n0 noisy copies (ties to the lowest
        class), and how many copies the base classifier evaluated to know it.

        The votes are counted in pieces, each the fewest further copies that could settle
        the argmax, and counting stops at the first copy after which no remaining one could
        change it: the guess is that of all n0 votes (up to batch-size dependent rounding
        of the model). The noise of all n0 copies is drawn in sample_counts' batches, so the
        generator ends where sample_counts would leave it and the draws after the selection
        are the same.
        """
        _check_counts(n0=n0, batch_size=batch_size)
        _check_image(x)
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        evaluated = 0
        for start in range(0, n0, batch_size):
            size = min(batch_size, n0 - start)
            batch = gaussian_noise(
                (size, *x.shape), self.sigma, generator, dtype=x.dtype, device=x.device
            ).add_(x)
            done = 0
            while done < size and (piece := _votes_to_settle(counts, n0 - evaluated)):
                piece = min(size - done, piece)
                counts += self._votes(batch[done:done + piece]).cpu()
                done, evaluated = done + piece, evaluated + piece
        return int(counts.argmax()), evaluated

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        with self._autocast(batch.device):
            logits = self.base_classifier(batch)
        self._check_logits(logits, len(batch))
        return logits

    def _votes(self, batch: torch.Tensor) -> torch.Tensor:
        """Votes of the base classifier on a batch of noisy copies: a [K] tensor."""
        logits = self._logits(batch)
        if not torch.isfinite(logits).all():
            raise NonFiniteOutputError(
                "the base classifier returned NaN or inf under noise; refusing to count its votes"
            )
        return torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)

    @torch.inference_mode()
    def base_predict(self, x: torch.Tensor) -> int:
        """The base classifier's prediction on x itself, without noise."""
        logits = self._logits(x.unsqueeze(0))
        if not torch.isfinite(logits).all():
            raise NonFiniteOutputError("the base classifier returned NaN or inf on a clean input")
        return int(logits.argmax(dim=1).item())

    def _check_logits(self, logits: torch.Tensor, batch: int) -> None:
        # Exactly num_classes columns: more would put votes outside the counts, fewer
        # means the model was built for another label set (its class i is not ours).
        if logits.dim() != 2 or tuple(logits.shape) != (batch, self.num_classes):
            raise ValueError(
                f"the base classifier returned logits of shape {tuple(logits.shape)}; "
                f"expected [{batch}, {self.num_classes}] (batch, num_classes)"
            )

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def _check_image(x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"expected one image [C, H, W], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("input image contains NaN or inf")


def _votes_to_settle(counts: torch.Tensor, remaining: int) -> int:
    """0 when `remaining` more votes cannot change argmax(counts) (ties to the lowest
    class); else the fewest further votes that could settle it, all for the leader (no
    other class can settle it sooner, so counting that many never passes the first vote
    that settles it)."""
    values = counts.tolist()
    leader = values.index(max(values))
    needed = 0
    for other, count in enumerate(values):
        if other != leader:
            # settled against `other` once the leader's lead reaches what is left, plus one
            # when a tie would go to `other`; each vote for the leader closes it by two
            short = remaining + (other < leader) - (values[leader] - count)
            needed = max(needed, math.ceil(short / 2))
    return needed


def _check_counts(batch_size: int, **sample_sizes: int) -> None:
    for name, value in {**sample_sizes, "batch_size": batch_size}.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _generator_for(x: torch.Tensor, generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator(device=x.device)
        generator.seed()
    elif generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, input on {x.device}")
    return generator
