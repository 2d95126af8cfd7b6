"""Micro-batching in DenoiseAndClassify: results do not depend on it, out of memory halves it.

The known answer is the pipeline on one big batch: every image is denoised and classified
on its own, so splitting a batch must give the same logits, votes and certificates. The
out-of-memory path is driven on the CPU by a denoiser that raises
`torch.cuda.OutOfMemoryError` for batches above a threshold, as CUDA would.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from classifiers import build_classifier
from denoisers import DENOISERS
from denoisers.pipeline import (
    FREE_MEMORY_SHARE,
    IF2_L_CLIP_B32_BYTES_PER_IMAGE_224,
    DenoiseAndClassify,
    default_micro_batch,
    micro_batch_that_fits,
)
from smoothing.core import Smooth
from tests.cli_helpers import invoke, rows, sidecar
from tests.tiny_classifiers import clip_options, save_tiny_clip
from tests.tiny_models import one_thread, save_tiny_ddpm, save_tiny_if2

SIGMA = 0.25
CLASSES = ["cat", "dog", "car"]


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def if2(tmp_path_factory):
    return DENOISERS.build("if2", sigma=SIGMA, checkpoint=str(save_tiny_if2(
        tmp_path_factory.mktemp("if2"))))


@pytest.fixture(scope="module")
def dds(tmp_path_factory):
    return DENOISERS.build("dds", sigma=SIGMA, checkpoint=str(save_tiny_ddpm(
        tmp_path_factory.mktemp("ddpm"))))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    options = clip_options(save_tiny_clip(root / "clip"), root / "cache")
    return build_classifier("clip-b32", class_names=CLASSES, **options).eval()


def noisy_images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 3, size, size), generator=g)
    return x + SIGMA * torch.randn(x.shape, generator=g)


class OutOfMemoryAbove(torch.nn.Module):
    """The wrapped denoiser, except that batches above `limit` raise CUDA's OOM error."""

    def __init__(self, denoiser: torch.nn.Module, limit: int):
        super().__init__()
        self.denoiser, self.limit, self.sigma = denoiser, limit, denoiser.sigma
        self.sizes: list[int] = []  # batch sizes asked for, including refused ones

    def forward(self, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
        self.sizes.append(noisy.shape[0])
        if noisy.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.denoiser(noisy, sigma)


@pytest.mark.parametrize("name", ["if2", "dds"])
@pytest.mark.parametrize("micro_batch", [1, 3, 4, 10, 64])
def test_logits_do_not_depend_on_the_micro_batch(request, clip, name, micro_batch):
    denoiser = request.getfixturevalue(name)
    noisy = noisy_images(10)
    with torch.inference_mode():
        whole = DenoiseAndClassify(denoiser, clip)(noisy)
        split = DenoiseAndClassify(denoiser, clip, micro_batch=micro_batch)(noisy)
    # float tolerance, not bit equality: CPU conv/matmul kernels may block differently
    # by batch size (measured: logits of size ~2 differ by up to 2e-6), so torch's float32
    # defaults (rtol 1.3e-6, atol 1e-5), and the argmax exactly
    torch.testing.assert_close(split, whole)
    assert torch.equal(split.argmax(1), whole.argmax(1))


def test_chunks_are_at_most_the_micro_batch_and_in_order(if2, clip):
    spy = OutOfMemoryAbove(if2, limit=1000)
    noisy = noisy_images(10)
    with torch.inference_mode():
        logits = DenoiseAndClassify(spy, clip, micro_batch=3)(noisy)
        by_image = torch.cat([clip(if2(noisy[i : i + 1], SIGMA)) for i in range(10)])
    assert spy.sizes == [3, 3, 3, 1]
    torch.testing.assert_close(logits, by_image)


def test_out_of_memory_halves_the_micro_batch_warns_and_gives_the_same_logits(if2, clip):
    noisy = noisy_images(10)
    spy = OutOfMemoryAbove(if2, limit=3)
    model = DenoiseAndClassify(spy, clip)  # auto: the whole batch on a CPU
    with torch.inference_mode(), pytest.warns(RuntimeWarning) as caught:
        logits = model(noisy)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "micro-batch is now 5" in messages[0] and "micro-batch is now 2" in messages[1]
    assert spy.sizes == [10, 5, 2, 2, 2, 2, 2]  # 10 and 5 refused, then five chunks of 2
    assert model.micro_batch == 2
    with torch.inference_mode():
        whole = DenoiseAndClassify(if2, clip)(noisy)
    torch.testing.assert_close(logits, whole)

    # the halved size is kept: the next call neither fails nor warns again
    spy.sizes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            model(noisy[:4])
    assert spy.sizes == [2, 2]


def test_out_of_memory_in_a_smaller_last_chunk_halves_from_that_chunk(if2, clip):
    spy = OutOfMemoryAbove(if2, limit=1)
    with torch.inference_mode(), pytest.warns(RuntimeWarning) as caught:
        DenoiseAndClassify(spy, clip, micro_batch=4)(noisy_images(6))
    assert ["is now 2" in str(w.message) for w in caught] == [True, False]
    assert "is now 1" in str(caught[1].message)
    # 4 refused -> 2 refused -> 1: the whole batch then goes one image at a time
    assert spy.sizes == [4, 2, 1, 1, 1, 1, 1, 1]


def test_out_of_memory_at_one_image_is_raised(if2, clip):
    model = DenoiseAndClassify(OutOfMemoryAbove(if2, limit=0), clip, micro_batch=2)
    with pytest.warns(RuntimeWarning, match="is now 1"), pytest.raises(
        torch.cuda.OutOfMemoryError
    ):
        with torch.inference_mode():
            model(noisy_images(3))


def test_other_errors_are_not_retried(if2, clip):
    model = DenoiseAndClassify(if2, clip, micro_batch=2)
    with pytest.raises(ValueError, match="channels"):
        model(noisy_images(4)[:, :2])
    assert model.micro_batch == 2


class BrighterThan(torch.nn.Module):
    """Two logits: is the image's mean above `level`? Votes split when it is near."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        margin = images.mean(dim=(1, 2, 3)) - self.level
        return torch.stack([-margin, margin], dim=1)


def test_certificates_do_not_depend_on_the_micro_batch(if2):
    x = torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        classifier = BrighterThan(float(if2(x[None], SIGMA).mean()))  # at the clean level

    def run(model):
        smooth = Smooth(model, num_classes=2, sigma=SIGMA)
        certified = smooth.certify(x, 8, 40, 0.001, 20, torch.Generator().manual_seed(1))
        counts = smooth.sample_counts(x, 40, 20, torch.Generator().manual_seed(2))
        return certified, counts

    whole, whole_counts = run(DenoiseAndClassify(if2, classifier))
    for model in (
        DenoiseAndClassify(if2, classifier, micro_batch=3),
        DenoiseAndClassify(OutOfMemoryAbove(if2, limit=6), classifier),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            certified, counts = run(model)
        assert certified == whole
        assert torch.equal(counts, whole_counts)
    assert int(whole_counts.max()) < 40  # the votes are split: the comparison is not trivial


def test_gradients_flow_through_micro_batches(if2, clip):
    noisy = noisy_images(6)
    grads = []
    for micro_batch in (None, 4):
        inputs = noisy.clone().requires_grad_(True)
        DenoiseAndClassify(if2, clip, micro_batch=micro_batch)(inputs)[:, 1].sum().backward()
        grads.append(inputs.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_micro_batch_below_one_is_refused(if2, clip):
    with pytest.raises(ValueError, match="micro_batch"):
        DenoiseAndClassify(if2, clip, micro_batch=0)


def test_default_is_the_whole_batch_on_a_cpu(if2):
    assert default_micro_batch(if2, noisy_images(37)) == 37


def test_micro_batch_that_fits_scales_with_pixels_and_precision():
    per_image = IF2_L_CLIP_B32_BYTES_PER_IMAGE_224[2]
    free = int(100 * per_image / FREE_MEMORY_SHARE) + 1  # room for exactly 100 at 224, 16-bit
    fits = micro_batch_that_fits(free, height=224, width=224, element_size=2, batch=10**6)
    assert fits == 100
    assert micro_batch_that_fits(free, height=224, width=448, element_size=2, batch=10**6) == 50
    assert micro_batch_that_fits(free, height=224, width=224, element_size=4, batch=10**6) == 50
    assert micro_batch_that_fits(free, height=224, width=224, element_size=2, batch=30) == 30
    assert micro_batch_that_fits(0, height=224, width=224, element_size=2, batch=30) == 1
    with pytest.raises(ValueError):
        micro_batch_that_fits(free, height=224, width=224, element_size=1, batch=30)


# ---------------------------------------------------------------- CLI


def test_cli_micro_batch_changes_no_row_and_is_not_a_resume_setting(tmp_path):
    from cli.main import certify_command

    common = ["--denoiser", "dds", "--n", "40", "--n0", "8", "--batch", "20", "--max", "3",
              "--quiet"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert invoke(certify_command, *common, "--out", str(whole),
                  catch_exceptions=True).exit_code == 0
    result = invoke(certify_command, *common, "--micro-batch", "3", "--out", str(split),
                    catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert rows(split, without_time=True) == rows(whole, without_time=True)
    assert len(rows(whole)) == 3
    record = sidecar(split)
    assert record["micro_batch"] == 3 and "micro_batch" not in record["settings"]
    assert sidecar(whole)["micro_batch"] == "auto"

    # another micro-batch resumes the same file instead of refusing it
    result = invoke(certify_command, *common, "--max", "4", "--micro-batch", "5",
                    "--out", str(split), catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert len(rows(split)) == 4
    assert sidecar(split)["micro_batch"] == 5


@pytest.mark.parametrize(
    "args", [["--micro-batch", "4"], ["--denoiser", "dds", "--micro-batch", "0"]]
)
def test_cli_refuses_a_micro_batch_without_denoiser_or_below_one(tmp_path, args):
    from cli.main import certify_command

    out = tmp_path / "r"
    result = invoke(certify_command, "--max", "2", "--out", str(out), *args, catch_exceptions=True)
    assert result.exit_code == 2
    assert "--micro-batch" in result.output
    assert not list(tmp_path.iterdir())  # nothing written

