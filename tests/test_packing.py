"""Packing several examples' draws into shared forward passes changes no draw."""

import json

import pytest
import torch
from torch import nn

from classifiers import build_classifier, build_dataset
from smoothing.core import Smooth
from smoothing.packing import base_predictions, packed_counts
from tests.cli_helpers import rows


class Spy(nn.Module):
    """Votes by its own row only (the first pixel's bin), and keeps every batch it sees."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.classes = classes
        self.batches: list[torch.Tensor] = []

    def forward(self, x):
        self.batches.append(x.clone())
        bins = (x.flatten(1)[:, 0] * self.classes).floor().clamp(0, self.classes - 1).long()
        return nn.functional.one_hot(bins, self.classes).float()


def requests_for(images, nums, seed=0):
    return [(x, num, torch.Generator().manual_seed(seed + i))
            for i, (x, num) in enumerate(zip(images, nums, strict=True))]


def test_packed_draws_and_counts_equal_the_unpacked_ones():
    images = [torch.rand(1, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    nums, batch = [100, 100, 250, 7, 64], 128
    spy = Spy()
    smooth = Smooth(spy, 4, 0.5)
    unpacked = [smooth.sample_counts(x, n, batch, g) for x, n, g in requests_for(images, nums)]
    seen_unpacked = torch.cat(spy.batches)
    spy.batches.clear()
    packed = packed_counts(smooth, requests_for(images, nums), batch)
    seen_packed = torch.cat(spy.batches)
    assert torch.equal(seen_packed, seen_unpacked)  # every noisy input, bit for bit, in order
    assert all(torch.equal(a, b) for a, b in zip(packed, unpacked, strict=True))
    assert all(b.shape[0] <= batch for b in spy.batches)
    # chunks 100 | 100 | 128, 122 | 7 | 64, packed whole in order: 7 + 64 share a pass
    assert [b.shape[0] for b in spy.batches] == [100, 100, 128, 122, 71]


def test_ten_predict_examples_share_one_pass_of_a_thousand():
    images = [torch.rand(1, 2, 2) for _ in range(10)]
    spy = Spy()
    packed_counts(Smooth(spy, 4, 0.25), requests_for(images, [100] * 10), 1000)
    assert [b.shape[0] for b in spy.batches] == [1000]


def test_a_chunk_is_never_split_and_passes_hold_whole_chunks():
    images = [torch.rand(1, 2, 2) for _ in range(3)]
    spy = Spy()
    packed_counts(Smooth(spy, 4, 0.25), requests_for(images, [60, 60, 60]), 100)
    assert [b.shape[0] for b in spy.batches] == [60, 60, 60]
    spy.batches.clear()
    packed_counts(Smooth(spy, 4, 0.25), requests_for(images, [150, 30, 20]), 100)
    # 150 is drawn as 100 + 50 (as sample_counts draws it); 50 + 30 + 20 fill the second
    assert [b.shape[0] for b in spy.batches] == [100, 100]


def test_certify_style_reuse_of_a_generator_keeps_its_order():
    images = [torch.rand(1, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    smooth = Smooth(Spy(), 4, 0.5)
    expected = []
    for i, x in enumerate(images):
        g = torch.Generator().manual_seed(i)
        expected += [smooth.sample_counts(x, 20, 50, g), smooth.sample_counts(x, 300, 50, g)]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    requests = [(x, 20, g) for x, g in zip(images, generators, strict=True)]
    requests += [(x, 300, g) for x, g in zip(images, generators, strict=True)]
    packed = packed_counts(smooth, requests, 50)
    selection, estimation = packed[:3], packed[3:]
    for i in range(3):
        assert torch.equal(selection[i], expected[2 * i])
        assert torch.equal(estimation[i], expected[2 * i + 1])


def test_digits_cnn_votes_and_clean_predictions_agree_with_the_unpacked_loop():
    torch.set_num_threads(1)
    dataset = build_dataset("digits", split="test")
    model = build_classifier("digits-sigma0.25", class_names=dataset.classes, sigma=0.25)
    smooth = Smooth(model, 10, 0.25)
    images = [dataset[i][0] for i in range(40)]
    unpacked = [smooth.sample_counts(x, 100, 1000, g)
                for x, _, g in requests_for(images, [100] * 40)]
    packed = packed_counts(smooth, requests_for(images, [100] * 40), 1000)
    flips = sum(int((a != b).any()) for a, b in zip(packed, unpacked, strict=True))
    # the same inputs; a batch-size dependent kernel could move a vote between near-ties,
    # which the docs report: on the digits CNN none moves
    assert flips == 0
    assert base_predictions(smooth, images) == [smooth.base_predict(x) for x in images]


def test_examples_of_different_shapes_are_refused():
    smooth = Smooth(Spy(), 4, 0.5)
    requests = [(torch.rand(1, 2, 2), 5, torch.Generator()),
                (torch.rand(1, 3, 3), 5, torch.Generator())]
    with pytest.raises(ValueError, match="share one"):
        packed_counts(smooth, requests, 10)


# ----------------------------------------------------------- packing in the dataset runner

class Counting(nn.Module):
    """The digits CNN, counting its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def _run(tmp_path, name, mode, pack, indices=range(40), dataset=None, model=None, **settings):
    from smoothing.runner import ResultFile, RunSettings, run

    torch.set_num_threads(1)
    dataset = dataset or build_dataset("digits", split="test")
    model = model or Counting(
        build_classifier("digits-sigma0.25", class_names=[str(i) for i in range(10)],
                         sigma=0.25))
    values = {"mode": mode, "n": 100, "n0": 10, "alpha": 0.001, "batch_size": 1000, **settings}
    results = ResultFile(tmp_path / name, mode, {"case": "packing", **values})
    run(Smooth(model, 10, 0.25), dataset, list(indices), results,
        RunSettings(**values, pack=pack), progress=False)
    return rows(results.stem, without_time=True), model, json.loads(results.sidecar.read_text())


@pytest.mark.parametrize("mode", ["predict", "certify"])
def test_packed_runs_write_the_rows_of_the_per_example_loop(tmp_path, mode):
    settings = {"n": 40} if mode == "certify" else {}
    packed, packed_model, packed_record = _run(tmp_path, "packed", mode, True, **settings)
    plain, plain_model, plain_record = _run(tmp_path, "plain", mode, False, **settings)
    assert packed == plain
    assert packed_record["forward_passes"] == plain_record["forward_passes"]
    assert packed_record["forward_passes_by_row"] == plain_record["forward_passes_by_row"]
    # predict: 40 x (1 noisy + 1 clean) calls unpacked, 4 x (1 + 1) packed (10 per pass);
    # certify (n0 10, n 40): 40 x 2 unpacked, 2 per 20 examples packed
    assert packed_model.calls * 10 <= plain_model.calls


def test_an_unreadable_image_in_a_group_is_skipped_and_the_others_unchanged(tmp_path):
    from classifiers.datasets import UnreadableImageError
    from smoothing.runner import ResultFile, RunSettings, run

    digits = build_dataset("digits", split="test")

    class Broken:
        classes = digits.classes

        def __len__(self):
            return len(digits)

        def __getitem__(self, index):
            if index == 3:
                raise UnreadableImageError("3.png", "damaged")
            return digits[index]

    plain, _, _ = _run(tmp_path, "plain", "predict", False, indices=range(12))
    values = {"mode": "predict", "n": 100, "n0": 10, "alpha": 0.001, "batch_size": 1000}
    results = ResultFile(tmp_path / "broken", "predict", {"case": "packing", **values})
    model = build_classifier("digits-sigma0.25", class_names=digits.classes, sigma=0.25)
    run(Smooth(model, 10, 0.25), Broken(), list(range(12)), results,
        RunSettings(**values, pack=True), progress=False, skip_errors=(UnreadableImageError,))
    assert rows(results.stem, without_time=True) == [row for row in plain if row["idx"] != "3"]
    assert json.loads(results.sidecar.read_text())["skipped"] == {
        "3": "cannot read image 3.png: damaged"}


def test_an_interrupted_packed_run_resumes_to_the_same_rows(tmp_path):
    reference, _, _ = _run(tmp_path, "reference", "predict", True)

    class Interrupting(Counting):
        def forward(self, x):
            if self.calls == 5:  # in the third group of ten
                raise KeyboardInterrupt
            return super().forward(x)

    model = Interrupting(build_classifier("digits-sigma0.25",
                                          class_names=[str(i) for i in range(10)], sigma=0.25))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", "predict", True, model=model)
    written = (tmp_path / "cut.tsv").read_text().splitlines()
    assert len(written) == 1 + 20  # two whole groups of ten: nothing of the third
    resumed, _, record = _run(tmp_path, "cut", "predict", True)
    assert resumed == reference and record["forward_passes_uncounted_rows"] == 0
