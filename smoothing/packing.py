"""Votes of several examples from shared forward passes, with each example's own draws.

PREDICT draws n = 100 noisy copies per example (seed 004's protocol); a model that takes
batches of 1000 then runs a tenth full. `packed_counts` fills each forward pass with the
draws of as many examples as fit. Every example's noise still comes from its own
generator, in the same chunks (`min(batch, remaining)` copies per draw) and order as
`Smooth.sample_counts` would draw them, so its noisy inputs are bit-identical to the
unpacked run's; only the composition of the batches around them changes (which kernels
that depend on the batch size may round differently: see tests/test_packing.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smoothing.core import NonFiniteOutputError, Smooth, _check_counts
from smoothing.noise import gaussian_noise


@torch.inference_mode()
def packed_counts(
    smooth: Smooth,
    requests: Sequence[tuple[torch.Tensor, int, torch.Generator]],
    batch_size: int,
) -> list[torch.Tensor]:
    """`[smooth.sample_counts(x, num, batch_size, g) for x, num, g in requests]`, packed.

    Requests are served in order, and so are the draws of each generator: a generator that
    appears twice (CERTIFY's selection, then estimation, draws) sees them in that order.
    A chunk is never split over two passes, so a pass holds at most `batch_size` copies
    and as many whole chunks as fit. Returns one [K] count tensor per request.
    """
    _check_counts(batch_size=batch_size)
    if not requests:
        return []
    shape = tuple(requests[0][0].shape)
    for x, num, _ in requests:
        _check_counts(num=num, batch_size=batch_size)
        if tuple(x.shape) != shape or x.dim() != 3:
            raise ValueError(f"packed examples must share one [C, H, W] shape, got "
                             f"{tuple(x.shape)} and {shape}")
        if not torch.isfinite(x).all():
            raise ValueError("input image contains NaN or inf")
    device, classes = requests[0][0].device, smooth.num_classes
    counts = torch.zeros(len(requests) * classes, dtype=torch.long, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    pending: list[torch.Tensor] = []  # noisy chunks of the next pass
    owners: list[torch.Tensor] = []  # the request index of each of their copies
    filled = 0

    def forward() -> None:
        nonlocal filled
        batch = torch.cat(pending) if len(pending) > 1 else pending[0]
        owner = torch.cat(owners) if len(owners) > 1 else owners[0]
        with smooth._autocast(device):
            logits = smooth.base_classifier(batch)
        smooth._check_logits(logits, batch.shape[0])
        counts.scatter_add_(0, owner * classes + logits.argmax(dim=1), torch.ones_like(owner))
        finite.logical_and_(torch.isfinite(logits).all())
        pending.clear()
        owners.clear()
        filled = 0

    for request, (x, num, generator) in enumerate(requests):
        for start in range(0, num, batch_size):
            size = min(batch_size, num - start)
            if filled + size > batch_size:
                forward()
            # the same call, shape and generator as Smooth.sample_counts: the same draws
            chunk = gaussian_noise((size, *shape), smooth.sigma, generator, dtype=x.dtype,
                                   device=device).add_(x)
            pending.append(chunk)
            owners.append(torch.full((size,), request, dtype=torch.long, device=device))
            filled += size
    forward()
    if not bool(finite):
        raise NonFiniteOutputError(
            "the base classifier returned NaN or inf under noise; refusing to count its votes"
        )
    return list(counts.view(len(requests), classes).unbind(0))


@torch.inference_mode()
def base_predictions(smooth: Smooth, images: Sequence[torch.Tensor]) -> list[int]:
    """`[smooth.base_predict(x) for x in images]` in one forward pass."""
    batch = torch.stack(list(images))
    with smooth._autocast(batch.device):
        logits = smooth.base_classifier(batch)
    smooth._check_logits(logits, batch.shape[0])
    if not torch.isfinite(logits).all():
        raise NonFiniteOutputError("the base classifier returned NaN or inf on a clean input")
    return [int(c) for c in logits.argmax(dim=1).tolist()]
