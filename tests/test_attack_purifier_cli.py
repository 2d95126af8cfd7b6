"""`attack --purifier`: the purifiers of seeds 000-003 under blind, BPDA and exact attacks."""

from __future__ import annotations

import pytest
import torch

from cli.attack import attack_command
from tests.cli_helpers import invoke, rows, sidecar

BASE = ["--model", "digits-clean", "--quiet", "--threads", "1", "--max", "3", "--eps", "0.5",
        "--steps", "5"]


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def attack(*args: str):
    return invoke(attack_command, *args)


def test_blind_attacks_the_classifier_alone_and_evaluates_it_purified(tmp_path):
    plain, blind = tmp_path / "plain", tmp_path / "blind"
    assert attack(*BASE, "--out", str(plain)).exit_code == 0
    result = attack(*BASE, "--purifier", "zeropur", "--gradient", "blind", "--out", str(blind))
    assert result.exit_code == 0, result.output
    # the same attack stream on the same classifier: the same perturbations
    assert [(r["l2"], r["linf"]) for r in rows(blind)] == [
        (r["l2"], r["linf"]) for r in rows(plain)
    ]
    record = sidecar(blind)["settings"]["purifier"]
    assert record["name"] == "zeropur" and record["gradient"] == "blind" and record["eot"] == 1
    assert record["settings"]["eps"] == pytest.approx(10 / 255)  # ZeroPur's default ball


def test_exact_and_bpda_gradients_give_other_perturbations_than_blind(tmp_path):
    norms = {}
    for gradient in ("blind", "bpda", "exact"):
        stem = tmp_path / gradient
        result = attack(*BASE, "--purifier", "zeropur", "--gradient", gradient,
                        "--out", str(stem))
        assert result.exit_code == 0, result.output
        assert sidecar(stem)["settings"]["purifier"]["gradient"] == gradient
        norms[gradient] = [r["l2"] for r in rows(stem)]
    assert norms["bpda"] != norms["blind"] and norms["exact"] != norms["blind"]


def test_purifier_options_reach_the_builder_and_are_recorded(tmp_path):
    stem = tmp_path / "z"
    result = attack(*BASE, "--purifier", "zeropur", "--gradient", "bpda",
                    "--purifier-option", "gs_steps=2", "--purifier-option", "blur=gaussian",
                    "--out", str(stem))
    assert result.exit_code == 0, result.output
    record = sidecar(stem)["settings"]["purifier"]
    assert record["options"] == {"gs_steps": 2, "blur": "gaussian"}
    assert record["settings"]["gs_steps"] == 2 and record["settings"]["blur"] == "gaussian"


def test_a_random_purifier_gives_the_same_rows_twice(tmp_path):
    args = [*BASE[:-4], "--max", "1", "--eps", "0.5", "--steps", "1", "--purifier", "cmap",
            "--gradient", "bpda", "--eot", "2", "--purifier-option", "steps=2",
            "--purifier-option", "num_latents=2"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert attack(*args, "--out", str(first)).exit_code == 0
    assert attack(*args, "--out", str(second)).exit_code == 0
    assert rows(first, without_time=True) == rows(second, without_time=True)
    assert sidecar(first)["settings"]["purifier"]["random"] is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gradient", "bpda"], "give --purifier"),
        (["--purifier", "zeropur", "--denoiser", "dds", "--sigma", "0.25"], "exclusive"),
        (["--purifier", "zeropur", "--sigma", "0.25", "--attack", "smoothadv"], "drop --sigma"),
        (["--purifier", "zeropur", "--purifier-option", "nokey"], "KEY=VALUE"),
        (["--purifier", "zeropur", "--purifier-option", "gradient=exact"], "--gradient"),
        (["--purifier", "zeropur", "--gradient", "blind", "--eot", "2"], "not with blind"),
        (["--purifier", "zeropur", "--purifier-option", "no_such_option=1"], "no_such_option"),
        (["--purifier", "clipure-cos"], "cannot wrap DigitsCNN"),
    ],
)
def test_bad_purifier_input_is_one_message_and_nothing_written(tmp_path, extra, message):
    stem = tmp_path / "bad"
    result = attack(*BASE, *extra, "--out", str(stem))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
