"""certify / predict from the command line: the embedded default, and bad input."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from classifiers import DATASETS
from classifiers.registry import Entry
from cli.main import certify_command, predict_command
from tests.cli_helpers import certify_interrupted_at, invoke, rows, sidecar

FAST = ["--n0", "20", "--n", "200", "--batch", "100", "--max", "4", "--quiet"]


@contextmanager
def registered_dataset(name: str, builder):
    DATASETS._entries[name] = Entry(name, builder, "test data")
    try:
        yield
    finally:
        del DATASETS._entries[name]


def test_certify_defaults_to_the_digits_demo(tmp_path):
    out = tmp_path / "demo"
    result = invoke(certify_command, *FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    header = (tmp_path / "demo.tsv").read_text().splitlines()[0]
    assert header == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    table = rows(out)
    assert len(table) == 4
    settings = sidecar(out)["settings"]
    assert (settings["model"], settings["dataset"], settings["sigma"]) == ("digits", "digits", 0.25)
    # a well-trained model certifies most of these easy examples
    assert sum(int(r["correct"]) for r in table) >= 3


def test_certify_rerun_resumes_and_extends(tmp_path):
    out = str(tmp_path / "run")
    invoke(certify_command, *FAST, "--out", out)
    first = (tmp_path / "run.tsv").read_text()
    result = invoke(certify_command, *FAST[:-3], "--max", "6", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    second = (tmp_path / "run.tsv").read_text()
    assert second.startswith(first) and len(second.splitlines()) == 7


def test_ctrl_c_keeps_the_finished_rows_and_the_same_command_resumes(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    uninterrupted = tmp_path / "whole"
    invoke(certify_command, *FAST, "--out", str(uninterrupted))

    with certify_interrupted_at(monkeypatch, 3):  # the third example
        result = invoke(certify_command, *FAST, "--out", out, catch_exceptions=True)
    assert result.exit_code == 130
    assert "interrupted: 2 rows are kept" in result.output
    assert len((tmp_path / "run.tsv").read_text().splitlines()) == 3

    result = invoke(certify_command, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert rows(tmp_path / "run", without_time=True) == rows(uninterrupted, without_time=True)


def test_predict_reports_empirical_clean_accuracy(tmp_path):
    result = invoke(predict_command, "--n", "50", "--max", "3", "--quiet",
                    "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert "empirical clean accuracy" in result.output
    header = (tmp_path / "p.tsv").read_text().splitlines()[0].split("\t")
    assert header[:5] == ["idx", "label", "predict", "correct", "time"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigma", "0"], "--sigma"),
        (["--sigma", "-0.5"], "--sigma"),
        (["--alpha", "0"], "--alpha"),
        (["--alpha", "1.5"], "--alpha"),
        (["--n0", "0"], "--n0"),
        (["--n", "0"], "--n"),
        (["--batch", "0"], "--batch"),
        (["--skip", "0"], "--skip"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--dataset", "no-such-data"], "unknown dataset 'no-such-data'"),
        (["--sigma", "0.3"], "sigma"),  # the digits model ships weights for 0.25 and 0.5 only
        (["--classifier-weights", "/nonexistent/w.safetensors"], "no such file"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "bogus"],
         "--device"),
    ],
)
def test_bad_input_gives_one_message_and_exit_2(tmp_path, args, message):
    out = tmp_path / "r"
    result = invoke(certify_command, *FAST, "--out", str(out), *args, catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.tsv").exists()


def test_missing_data_root_is_refused(tmp_path):
    result = invoke(certify_command, *FAST, "--dataset", f"folder:{tmp_path / 'missing'}",
                    "--out", str(tmp_path / "r"), catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert "missing" in result.output


def test_results_of_other_settings_are_left_untouched(tmp_path):
    out = str(tmp_path / "run")
    invoke(certify_command, *FAST, "--out", out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = invoke(certify_command, *FAST, "--n", "300", "--out", out, catch_exceptions=True)
    assert result.exit_code == 2
    assert "other settings" in result.output and "--overwrite" in result.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    result = invoke(certify_command, *FAST, "--n", "300", "--out", out, "--overwrite")
    assert result.exit_code == 0
    assert sidecar(tmp_path / "run")["settings"]["n"] == 300


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "file").write_text("")
    result = invoke(certify_command, *FAST, "--out", str(tmp_path / "file" / "r"),
                    catch_exceptions=True)
    assert result.exit_code == 2
    assert "cannot create output folder" in result.output


class NanImages:
    classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        image = torch.zeros(1, 8, 8)
        if index == 2:
            image[0, 3, 3] = float("nan")
        return image, 0


def test_nan_in_the_input_fails_with_exit_2_and_keeps_rows(tmp_path):
    with registered_dataset("nan-images", lambda split, data_root: NanImages()):
        result = invoke(certify_command, *FAST, "--dataset", "nan-images",
                        "--out", str(tmp_path / "r"), catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert "NaN" in result.output
    assert len((tmp_path / "r.tsv").read_text().splitlines()) == 1 + 2


def test_nan_from_the_classifier_fails_loudly(tmp_path, monkeypatch):
    import classifiers.digits as digits

    original = digits.DigitsCNN.forward

    def broken(self, x):
        logits = original(self, x)
        logits[0, 0] = float("inf")
        return logits

    monkeypatch.setattr(digits.DigitsCNN, "forward", broken)
    result = invoke(certify_command, *FAST, "--out", str(tmp_path / "r"), catch_exceptions=True)
    assert result.exit_code != 0
    assert "NaN or inf" in result.output and "nothing was written" in result.output
    # it failed before its first row: nothing is left to block the corrected rerun
    assert list(tmp_path.iterdir()) == []


def test_help_explains_the_certificate():
    result = invoke(certify_command, "--help")
    assert "radius" in result.output and "1 - alpha" in result.output


@pytest.mark.parametrize("flag", [["--allow-untrained-sigma"], ["--micro-batch", "8"]])
def test_denoiser_only_options_without_a_denoiser_are_refused(tmp_path, flag):
    result = invoke(certify_command, *flag, "--out", str(tmp_path / "run"), catch_exceptions=True)
    assert result.exit_code == 2 and "--denoiser" in result.output
    assert list(tmp_path.iterdir()) == []
