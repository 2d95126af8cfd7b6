"""The smoothing noise (smoothing/noise.py): Gaussian tails, one sampler for every draw.

Known answers: the exact Gaussian tail probabilities P(|Z| > t) = 2 * Phi(-t) from scipy,
and the largest |z| torch's float32 `normal_` can return on the CPU, sqrt(-2 ln 2^-24)
(Box-Muller on 24-bit uniforms, aten/src/ATen/native/cpu/DistributionTemplates.h). Counts of
draws beyond t must lie in the acceptance region of Binomial(N, 2 * Phi(-t)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import binom, norm

import smoothing.noise
from smoothing import stats
from smoothing.attacks import draw_noise
from smoothing.core import Smooth
from smoothing.noise import NOISE_SAMPLER, gaussian_noise
from smoothing.runner import ResultFileError
from tests.tiny_models import one_thread

# The float32 CPU sampler's cap: its smallest uniform 1 - u is 2^-24.
FLOAT32_CPU_LARGEST_Z = math.sqrt(-2.0 * math.log(2.0**-24))  # 5.768


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def acceptance_region(draws: int, p: float, level: float) -> tuple[int, int]:
    """Counts a Binomial(draws, p) variable falls outside of with probability <= level."""
    return int(binom.ppf(level / 2, draws, p)), int(binom.isf(level / 2, draws, p))


def beyond(noise: torch.Tensor, sigma: float, t: float) -> int:
    return int((noise.abs() > t * sigma).sum())


def test_the_draw_is_torchs_float64_normal_rounded_whatever_the_chunking(monkeypatch):
    # 1013 values: not a multiple of torch's pairing block of 16, nor of the chunk
    reference = torch.empty((1013,), dtype=torch.float64).normal_(0.0, 0.3, generator=seeded(1))
    for chunk in (16, 64, 2**23):
        monkeypatch.setattr(smoothing.noise, "_CHUNK_ELEMENTS", chunk)
        noise = gaussian_noise((1013,), 0.3, seeded(1))
        assert torch.equal(noise, reference.float())
        assert torch.equal(gaussian_noise((1013,), 0.3, seeded(1), dtype=torch.float64), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device_and_determinism(dtype):
    shape = (5, 3, 4, 4)
    first = gaussian_noise(shape, 0.5, seeded(2), dtype=dtype)
    assert first.shape == shape and first.dtype == dtype and first.device.type == "cpu"
    assert torch.equal(first, gaussian_noise(shape, 0.5, seeded(2), dtype=dtype, device="cpu"))
    assert not torch.equal(first, gaussian_noise(shape, 0.5, seeded(3), dtype=dtype))
    generator = seeded(2)
    gaussian_noise(shape, 0.5, generator, dtype=dtype)
    assert not torch.equal(first, gaussian_noise(shape, 0.5, generator, dtype=dtype))  # it advanced


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan])
def test_a_sigma_that_is_not_positive_and_finite_is_refused(sigma):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise((4,), sigma, seeded(0))


def test_no_global_random_state_is_used():
    state = torch.get_rng_state()
    gaussian_noise((64,), 1.0, seeded(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_counts_beyond_1_to_5_sigma_are_gaussian():
    draws, sigma = 2**25, 0.5  # sigma 0.5: every threshold t * sigma is exact in float32
    noise = gaussian_noise((draws,), sigma, seeded(4))
    for t in (1, 2, 3, 4, 5):
        low, high = acceptance_region(draws, 2 * norm.sf(t), 1e-6)
        assert low <= beyond(noise, sigma, t) <= high, t
    # the standard deviation itself, against its sampling error (4 standard errors)
    assert abs(noise.double().std().item() / sigma - 1) < 4 / math.sqrt(2 * draws)


def test_certify_and_the_attacks_draw_from_this_sampler():
    # CERTIFY's noisy inputs (zero image: the input is the noise itself) and SmoothAdv's
    # noise are this function's draws from the same generator state
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 2)

    x = torch.zeros(1, 4, 4)
    Smooth(Spy(), 2, 0.25).sample_counts(x, 30, 20, seeded(5))
    generator = seeded(5)
    expected = [gaussian_noise((size, 1, 4, 4), 0.25, generator) for size in (20, 10)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    batch = torch.zeros(3, 1, 4, 4)
    assert torch.equal(draw_noise(batch, 7, 0.5, seeded(6)),
                       gaussian_noise((3, 7, 1, 4, 4), 0.5, seeded(6)))


def test_results_of_another_sampler_are_refused_on_resume(tmp_path):
    from tests.test_runner import certify_all

    results = certify_all(tmp_path / "run")
    record = json.loads(results.sidecar.read_text())
    assert record["settings"]["noise"] == NOISE_SAMPLER
    # a file written before the sampler was recorded (torch's float32 normal_)
    del record["settings"]["noise"]
    results.sidecar.write_text(json.dumps(record))
    tsv = results.tsv.read_bytes()
    with pytest.raises(ResultFileError, match="other settings.*noise: '<unset>'"):
        certify_all(tmp_path / "run")
    assert results.tsv.read_bytes() == tsv
    certify_all(tmp_path / "run", overwrite=True)
    assert json.loads(results.sidecar.read_text())["settings"]["noise"] == NOISE_SAMPLER


class LargeNoiseDetector(torch.nn.Module):
    """The issue's contrived classifier: class 1 when some coordinate of its input exceeds
    `threshold` in absolute value, class 0 otherwise. Also counts coordinates beyond `levels`."""

    def __init__(self, threshold: float, levels: tuple[float, ...]):
        super().__init__()
        self.threshold, self.levels = threshold, levels
        self.beyond = [0] * len(levels)
        self.largest = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        magnitude = x.flatten(1).abs()
        peak = magnitude.amax(dim=1)
        self.largest = max(self.largest, float(peak.max()))
        large = magnitude[magnitude > min(self.levels)]  # few: the rest is counted on them
        for k, level in enumerate(self.levels):
            self.beyond[k] += int((large > level).sum())
        vote = (peak > self.threshold).float()
        return torch.stack([1 - vote, vote], dim=1)


@pytest.mark.slow
def test_a_classifier_of_large_noise_coordinates_is_certified_correctly():
    # The example, on a 3x224x224 input: f votes 1 iff some |noise coordinate| > 5.8
    # sigma. Under N(0, sigma^2 I), P(f = 1) = 1 - (1 - 2 Phi(-5.8))^d ~ 1.0e-3. torch's
    # float32 normal_ never exceeds 5.768 sigma, so it sees no such vote, and the certificate
    # it gives claims p_A >= alpha^(1/n), above the true p_A: a false certificate.
    sigma, n, batch, alpha = 0.25, 12_000, 100, 0.001
    shape = (3, 224, 224)
    d = math.prod(shape)
    levels = (5.0, 5.8, 6.0)
    vote_probability = -math.expm1(d * math.log1p(-2 * norm.sf(5.8)))
    true_p_a = 1 - vote_probability
    votes_region = acceptance_region(n, vote_probability, 1e-4)
    coordinate_regions = [acceptance_region(n * d, 2 * norm.sf(t), 1e-4) for t in levels]
    assert votes_region[0] > 0 and coordinate_regions[1][0] > 0  # "none" would fail both

    detector = LargeNoiseDetector(5.8 * sigma, tuple(t * sigma for t in levels))
    counts = Smooth(detector, 2, sigma).sample_counts(torch.zeros(shape), n, batch, seeded(7))
    assert votes_region[0] <= int(counts[1]) <= votes_region[1]
    for count, (low, high) in zip(detector.beyond, coordinate_regions, strict=True):
        assert low <= count <= high
    assert detector.largest > FLOAT32_CPU_LARGEST_Z * sigma
    # its certificate bounds the true p_A from below
    assert stats.lower_confidence_bound(int(counts[0]), n, alpha) < true_p_a

    # the same classifier on torch's float32 normal_, the engine's former draw
    old = LargeNoiseDetector(5.8 * sigma, tuple(t * sigma for t in levels))
    generator, votes = seeded(7), 0
    with torch.inference_mode():
        for _ in range(n // batch):
            noise = torch.empty((batch, *shape)).normal_(0.0, sigma, generator=generator)
            votes += int(old(noise)[:, 1].sum())
    assert votes == 0 and old.beyond[1] == old.beyond[2] == 0
    assert old.largest <= FLOAT32_CPU_LARGEST_Z * sigma * (1 + 1e-6)
    assert not votes_region[0] <= votes  # the check above fails for it
    assert stats.lower_confidence_bound(n - votes, n, alpha) > true_p_a  # a false certificate
