"""The dataset runner: seeding, resume, refusal, result-file format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoothing.core import Smooth
from smoothing.noise import NOISE_SAMPLER
from smoothing.runner import (
    COLUMNS,
    ResultFile,
    ResultFileError,
    RunSettings,
    example_seed,
    floor_radius,
    run,
    select_indices,
)
from tests.cli_helpers import rows


class Linear(torch.nn.Module):
    """Two classes split by the hyperplane x[0] = 0.5 in a [1, 2, 2] image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1)[:, 0] - 0.5
        return torch.stack([-score, score], dim=1)


class Interrupting(torch.nn.Module):
    """Raises KeyboardInterrupt on the `after`-th forward pass, like a Ctrl-C."""

    def __init__(self, after: int):
        super().__init__()
        self.inner, self.calls, self.after = Linear(), 0, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner(x)


def make_dataset(size: int = 8) -> list[tuple[torch.Tensor, int]]:
    values = torch.linspace(0.0, 1.0, size)
    return [(torch.full((1, 2, 2), float(v)), int(v > 0.5)) for v in values]


SETTINGS = dict(mode="certify", n=200, n0=20, alpha=0.01, batch_size=64, seed=3)


def certify_all(stem, model=None, indices=None, settings=None, **kwargs):
    dataset = make_dataset()
    smooth = Smooth(model or Linear(), 2, sigma=0.25)
    results = ResultFile(stem, "certify", {"case": "linear", **SETTINGS}, **kwargs)
    run(smooth, dataset, indices or range(len(dataset)), results,
        RunSettings(**(settings or SETTINGS)), progress=False)
    return results


def test_rows_have_cohens_columns_and_sidecar_records_settings(tmp_path):
    results = certify_all(tmp_path / "run")
    header, *rows = results.tsv.read_text().splitlines()
    assert header.split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(8))
    record = json.loads(results.sidecar.read_text())
    assert record["settings"]["seed"] == 3 and record["finished"] is not None
    assert record["rows"] == 8 and "torch" in record["versions"]


def test_a_dot_in_the_stem_is_kept_in_the_file_names(tmp_path):
    # "sigma0.25" must not lose ".25" as if it were a file extension
    results = certify_all(tmp_path / "digits_sigma0.25")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_sigma0.25.json", "digits_sigma0.25.tsv"
    ]
    assert results.tsv == tmp_path / "digits_sigma0.25.tsv"


def test_same_seed_gives_identical_rows(tmp_path):
    first = certify_all(tmp_path / "a")
    second = certify_all(tmp_path / "b")
    assert rows(first.stem, without_time=True) == rows(second.stem, without_time=True)


def test_other_seed_gives_other_rows(tmp_path):
    first = certify_all(tmp_path / "a")
    other = certify_all(tmp_path / "b", settings={**SETTINGS, "seed": 4})
    assert rows(first.stem, without_time=True) != rows(other.stem, without_time=True)


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(tmp_path):
    reference = certify_all(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        certify_all(tmp_path / "cut", model=Interrupting(after=13))
    partial = (tmp_path / "cut.tsv").read_text().splitlines()
    assert 1 < len(partial) < 9, "the interruption should leave some rows written"
    assert json.loads((tmp_path / "cut.json").read_text())["finished"] is None
    resumed = certify_all(tmp_path / "cut")
    assert rows(resumed.stem, without_time=True) == rows(reference.stem, without_time=True)
    assert json.loads(resumed.sidecar.read_text())["resumed"], "the resume is recorded"


def test_a_partly_written_last_line_is_discarded_and_recomputed(tmp_path):
    reference = certify_all(tmp_path / "ref")
    lines = reference.tsv.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut"
    (tmp_path / "cut.tsv").write_text("".join(lines[:4]) + lines[4][:5])
    (tmp_path / "cut.json").write_text(reference.sidecar.read_text())
    resumed = certify_all(cut)
    assert rows(resumed.stem, without_time=True) == rows(reference.stem, without_time=True)


def test_resume_never_recomputes_finished_rows(tmp_path):
    certify_all(tmp_path / "run", indices=range(4))
    before = (tmp_path / "run.tsv").read_text()
    model = Interrupting(after=10**9)
    certify_all(tmp_path / "run", model=model)
    after = (tmp_path / "run.tsv").read_text()
    assert after.startswith(before)
    # 4 new examples x (1 selection batch + 4 estimation batches of 64 for n=200)
    assert model.calls == 4 * (1 + math.ceil(200 / 64))


def test_other_settings_are_refused_and_files_untouched(tmp_path):
    results = certify_all(tmp_path / "run")
    tsv, sidecar = results.tsv.read_bytes(), results.sidecar.read_bytes()
    changed = ResultFile(tmp_path / "run", "certify", {"case": "linear", **SETTINGS, "n": 300})
    with pytest.raises(ResultFileError, match="other settings.*n: 200 -> 300"):
        run(Smooth(Linear(), 2, 0.25), make_dataset(), range(8), changed,
            RunSettings(**{**SETTINGS, "n": 300}), progress=False)
    assert results.tsv.read_bytes() == tsv and results.sidecar.read_bytes() == sidecar


def test_overwrite_replaces_the_results(tmp_path):
    certify_all(tmp_path / "run")
    replaced = ResultFile(tmp_path / "run", "certify", {"case": "other"}, overwrite=True)
    run(Smooth(Linear(), 2, 0.25), make_dataset(), range(2), replaced,
        RunSettings(**SETTINGS), progress=False)
    assert len(replaced.tsv.read_text().splitlines()) == 3
    settings = json.loads(replaced.sidecar.read_text())["settings"]
    assert settings == {"case": "other", "noise": NOISE_SAMPLER}


def test_results_without_sidecar_are_refused(tmp_path):
    (tmp_path / "run.tsv").write_text("idx\tlabel\n")
    with pytest.raises(ResultFileError, match="unknown settings"):
        certify_all(tmp_path / "run")
    assert (tmp_path / "run.tsv").read_text() == "idx\tlabel\n"


def test_unwritable_output_folder_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ResultFileError, match="cannot create output folder"):
        certify_all(blocker / "run")


def test_nan_in_an_image_fails_and_keeps_earlier_rows(tmp_path):
    dataset = make_dataset()
    dataset[3] = (torch.full((1, 2, 2), float("nan")), 0)
    results = ResultFile(tmp_path / "run", "certify", {"case": "nan"})
    with pytest.raises(ValueError, match="NaN"):
        run(Smooth(Linear(), 2, 0.25), dataset, range(8), results,
            RunSettings(**SETTINGS), progress=False)
    assert len(results.tsv.read_text().splitlines()) == 1 + 3


def test_predict_scores_abstentions_with_the_base_classifier(tmp_path):
    # at x[0] = 0.5 + tiny the vote is a coin flip: PREDICT abstains, the base says class 1
    dataset = [(torch.full((1, 2, 2), 0.5001), 1), (torch.full((1, 2, 2), 0.5001), 0)]
    results = ResultFile(tmp_path / "p", "predict", {"case": "predict"})
    run(Smooth(Linear(), 2, 0.25), dataset, range(2), results,
        RunSettings(mode="predict", n=100, alpha=0.001, batch_size=50, seed=0), progress=False)
    header, *rows = results.tsv.read_text().splitlines()
    assert tuple(header.split("\t")) == COLUMNS["predict"]
    first, second = (dict(zip(COLUMNS["predict"], r.split("\t"), strict=True)) for r in rows)
    assert first["predict"] == second["predict"] == "-1"
    assert first["base_predict"] == second["base_predict"] == "1"
    assert (first["correct"], first["clean_correct"]) == ("0", "1")
    assert (second["correct"], second["clean_correct"]) == ("0", "0")


def test_radius_is_written_rounded_down():
    assert floor_radius(0.1234569) == "0.123456"
    assert floor_radius(0.25) == "0.250000"
    assert float(floor_radius(0.2499999999)) < 0.25


def test_example_seed_depends_on_seed_and_index_only():
    assert example_seed(0, 5) == example_seed(0, 5)
    assert len({example_seed(s, i) for s in range(5) for i in range(50)}) == 250


def test_select_indices():
    assert select_indices(10, start=2, skip=3) == [2, 5, 8]
    assert select_indices(10, start=1, skip=2, max_examples=2) == [1, 3]
    with pytest.raises(ValueError, match="past the end"):
        select_indices(10, start=10)
