"""Fewer forward passes, same numbers (issue 11, section 1): `certify --early-exit`,
`certify --sequential --radii`, and the `forward_passes` count of every run's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from classifiers import build_classifier, build_dataset
from cli.analyze import analyze_command
from cli.attack import attack_command
from cli.main import certify_command, predict_command
from smoothing import analysis
from smoothing.core import Smooth
from smoothing.runner import example_generator
from smoothing.sequential import (
    BOUNDARY_RULE,
    FUTILITY_RULE,
    certify_at_radii,
    design,
    thresholds,
)
from tests.cli_helpers import certify_interrupted_at, invoke, rows, sidecar

N0, N = 20, 200
FAST = ["--n0", str(N0), "--n", str(N), "--batch", "100", "--quiet", "--threads", "1"]
# A clean model under heavy noise: many of its guesses are wrong, so early exit has work
WRONG_GUESSES = ["--model", "digits-clean", "--sigma", "0.5", "--max", "30"]


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads 1 sets it for the process


def summary(stem: Path) -> list[dict]:
    """analyze's JSON summary at its default radii, without the file name."""
    result = invoke(analyze_command, str(stem.with_name(stem.name + ".tsv")), "--format", "json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    for entry in entries:
        del entry["file"]
    return entries


# ------------------------------------------------------------------------ forward passes


def test_certify_and_predict_count_their_forward_passes(tmp_path):
    certify, predict = tmp_path / "c", tmp_path / "p"
    assert invoke(certify_command, *FAST, "--max", "3", "--out", str(certify)).exit_code == 0
    record = sidecar(certify)
    assert record["forward_passes"] == 3 * (N0 + N)
    assert record["forward_passes_by_row"] == {str(i): N0 + N for i in range(3)}
    assert record["forward_passes_uncounted_rows"] == 0
    # predict: n noisy copies and the clean input (base_predict) per row
    assert invoke(predict_command, *FAST[2:], "--max", "3", "--out", str(predict)).exit_code == 0
    assert sidecar(predict)["forward_passes"] == 3 * (N + 1)


def test_forward_passes_add_up_over_resumes_and_interruptions(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with certify_interrupted_at(monkeypatch, 3):  # the third example
        result = invoke(certify_command, *FAST, "--max", "5", "--out", str(out),
                        catch_exceptions=True)
    assert result.exit_code == 130
    # the interrupted example drew nothing that counts: it has no row
    assert sidecar(out)["forward_passes"] == 2 * (N0 + N)
    assert invoke(certify_command, *FAST, "--max", "5", "--out", str(out)).exit_code == 0
    assert sidecar(out)["forward_passes"] == 5 * (N0 + N)

    # A process killed between a row and its sidecar: that row's count is lost, said so
    record = sidecar(out)
    del record["forward_passes_by_row"]["4"]
    out.with_name("run.json").write_text(json.dumps(record))
    assert invoke(certify_command, *FAST, "--max", "6", "--out", str(out)).exit_code == 0
    record = sidecar(out)
    assert record["forward_passes"] == 5 * (N0 + N)  # rows 0-3 and 5
    assert record["forward_passes_uncounted_rows"] == 1


def test_attack_counts_every_forward_pass_of_the_model(tmp_path):
    # PGD-3 without smoothing: the clean decision, 3 gradient steps, the decision on x_adv
    out = tmp_path / "pgd"
    result = invoke(attack_command, "--model", "digits-sigma0.25", "--attack", "pgd",
                    "--eps", "0.5", "--steps", "3", "--max", "2", "--quiet", "--threads", "1",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sidecar(out)["forward_passes_by_row"] == {"0": 5, "1": 5}


# ---------------------------------------------------------------------------- early exit


def test_early_exit_changes_only_wrong_guesses_and_not_the_analyze_table(tmp_path):
    full, early = tmp_path / "full", tmp_path / "early"
    assert invoke(certify_command, *FAST, *WRONG_GUESSES, "--out", str(full)).exit_code == 0
    result = invoke(certify_command, *FAST, *WRONG_GUESSES, "--early-exit", "--out", str(early))
    assert result.exit_code == 0, result.output
    exited = 0
    for whole, cut in zip(rows(full, without_time=True), rows(early, without_time=True),
                          strict=True):
        if cut["predict"] in (cut["label"], "-1"):
            assert cut == whole  # the guess was right: the same draws, the same row
        else:
            exited += 1
            assert (cut["radius"], cut["correct"]) == ("0.000000", "0")
            assert whole["correct"] == "0"
    assert exited >= 1  # the clean model guesses some wrong under sigma = 0.5 noise
    assert summary(early) == summary(full)
    record = sidecar(early)
    assert record["settings"]["early_exit"] is True
    assert "early_exit" not in sidecar(full)["settings"]  # old files resume unchanged
    assert record["forward_passes"] == 30 * (N0 + N) - exited * N
    assert sidecar(full)["forward_passes"] == 30 * (N0 + N)


def test_a_resume_with_other_scale_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    assert invoke(certify_command, *FAST, "--max", "2", "--out", str(out)).exit_code == 0
    before = out.with_name("run.tsv").read_text(), out.with_name("run.json").read_text()
    for extra in (["--early-exit"], ["--sequential", "--radii", "0,0.25"]):
        result = invoke(certify_command, *FAST, "--max", "3", *extra, "--out", str(out),
                        catch_exceptions=True)
        assert result.exit_code == 2, result.output
        assert "other settings" in result.output
    assert (out.with_name("run.tsv").read_text(), out.with_name("run.json").read_text()) \
        == before


def _as_the_first_futility_rule_wrote_it(settings: dict) -> None:
    del settings["futility_rule"]


def _as_the_clopper_pearson_design_wrote_it(settings: dict) -> None:
    # a test per look with alpha split over the looks, the last look's counts set exactly
    settings["alphas"] = [0.0001] * (len(settings["looks"]) - 1) + [0.0005]
    settings["last_counts"] = [row[-1] for row in settings.pop("counts")]
    del settings["spent"], settings["boundary_rule"]


@pytest.mark.parametrize("earlier", [_as_the_first_futility_rule_wrote_it,
                                     _as_the_clopper_pearson_design_wrote_it])
def test_a_sequential_file_of_an_earlier_design_is_refused_on_resume(tmp_path, earlier):
    out = tmp_path / "seq"
    args = [*FAST, "--sequential", "--radii", "0,0.25", "--looks", "5", "--out", str(out)]
    assert invoke(certify_command, *args, "--max", "2").exit_code == 0
    record = sidecar(out)
    earlier(record["settings"]["sequential"])
    out.with_name("seq.json").write_text(json.dumps(record))
    before = out.with_name("seq.tsv").read_text()
    result = invoke(certify_command, *args, "--max", "3", catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert "other settings" in result.output
    assert out.with_name("seq.tsv").read_text() == before


# ---------------------------------------------------------------------------- sequential


def test_sequential_rows_radius_is_the_largest_certified_radius_of_the_grid(tmp_path):
    out = tmp_path / "seq"
    grid = "0,0.25,0.5"
    result = invoke(certify_command, *FAST, "--max", "4", "--sequential", "--radii", grid,
                    "--looks", "5", "--out", str(out))
    assert result.exit_code == 0, result.output
    plan = design(N, 0.001, tuple(float(t) for t in thresholds((0.0, 0.25, 0.5), 0.25)),
                  looks=5)
    record = sidecar(out)
    assert record["settings"]["sequential"] == {
        "radii": [0.0, 0.25, 0.5], "looks": list(plan.looks),
        "spent": [list(row) for row in plan.spent], "counts": [list(row) for row in plan.counts],
        "futility": 0.07, "futility_from": 400, "boundary_rule": BOUNDARY_RULE,
        "futility_rule": FUTILITY_RULE,
    }
    # the same certificates through the library, each example's generator as the runner's
    dataset = build_dataset("digits", split="test")
    model = build_classifier("digits", class_names=dataset.classes, sigma=0.25)
    smooth = Smooth(model, 10, 0.25)
    for row in rows(out):
        index = int(row["idx"])
        certificate = certify_at_radii(
            smooth, dataset[index][0], N0, N, 0.001, 100, (0.0, 0.25, 0.5),
            example_generator(0, index, "cpu"), looks=5,
        )
        assert (int(row["predict"]), float(row["radius"])) == (
            certificate.prediction, certificate.radius
        )
        assert float(row["radius"]) in (0.0, 0.25, 0.5)
        assert record["forward_passes_by_row"][row["idx"]] == certificate.samples


def test_sequential_with_early_exit(tmp_path):
    plain, early = tmp_path / "plain", tmp_path / "early"
    args = [*FAST, *WRONG_GUESSES, "--sequential", "--radii", "0,0.25,0.5"]
    assert invoke(certify_command, *args, "--out", str(plain)).exit_code == 0
    assert invoke(certify_command, *args, "--early-exit", "--out", str(early)).exit_code == 0
    dataset = build_dataset("digits", split="test")
    smooth = Smooth(build_classifier("digits-clean", class_names=dataset.classes, sigma=0.5),
                    10, 0.5)
    exited = 0
    for whole, cut in zip(rows(plain, without_time=True), rows(early, without_time=True),
                          strict=True):
        if cut["predict"] in (cut["label"], "-1"):
            assert cut == whole
        else:
            exited += 1
            assert (cut["radius"], cut["correct"], whole["correct"]) == ("0.000000", "0", "0")
            # only the selection draws that settled the guess were evaluated
            index = int(cut["idx"])
            generator = example_generator(0, index, "cpu")
            _, settled = smooth.guess(dataset[index][0], N0, 100, generator)
            assert sidecar(early)["forward_passes_by_row"][cut["idx"]] == settled <= N0
    assert exited >= 1
    assert summary(early) == summary(plain)


def test_analyze_says_a_sequential_acr_is_a_grid_acr(tmp_path):
    sequential, standard = tmp_path / "seq", tmp_path / "std"
    assert invoke(certify_command, *FAST, "--max", "4", "--sequential", "--radii", "0,0.25",
                  "--out", str(sequential)).exit_code == 0
    assert invoke(certify_command, *FAST, "--max", "4", "--out", str(standard)).exit_code == 0
    result = invoke(analyze_command, str(tmp_path / "seq.tsv"), str(tmp_path / "std.tsv"),
                    "--radii", "0,0.25")
    assert result.exit_code == 0, result.output
    assert "seq: sequential at radii 0.0, 0.25" in result.output
    assert "grid-ACR" in result.output and "std: sequential" not in result.output
    # the table still reads the rows: ACR = mean radius of the correct rows
    table = rows(sequential)
    acr = sum(float(r["radius"]) * int(r["correct"]) for r in table) / len(table)
    line = next(line for line in result.output.splitlines() if line.startswith("seq "))
    assert line.split()[2] == f"{acr:.3f}"
    assert analysis.load_results(tmp_path / "seq.tsv").radius_grid == (0.0, 0.25)
    assert analysis.load_results(tmp_path / "std.tsv").radius_grid is None
    (entry,) = summary(sequential)
    assert entry["radius_grid"] == [0.0, 0.25]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (certify_command, ["--sequential"], "--sequential needs --radii"),
        (certify_command, ["--sequential", "--radii", "0.5,0.25"], "strictly increasing"),
        (certify_command, ["--sequential", "--radii", "0,-0.25"], ">= 0"),
        (certify_command, ["--sequential", "--radii", "0,x"], "--radii"),
        (certify_command, ["--radii", "0,0.5"], "--radii applies with --sequential only"),
        (certify_command, ["--looks", "4"], "--looks applies with --sequential only"),
        (certify_command, ["--sequential", "--radii", "0,1", "--futility", "1"], "--futility"),
        (certify_command, ["--sequential", "--radii", "0,1", "--looks", "0"], "--looks"),
        (predict_command, ["--early-exit"], "--early-exit is a certify option"),
        (predict_command, ["--sequential"], "--sequential is a certify option"),
        (predict_command, ["--radii", "0,1"], "--radii is a certify option"),
    ],
)
def test_bad_scale_options_give_one_message_and_exit_2(tmp_path, command, args, message):
    fast = FAST if command is certify_command else FAST[2:]
    result = invoke(command, *fast, "--max", "2", *args, "--out", str(tmp_path / "r"),
                    catch_exceptions=True)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_counter_counts_images_of_the_outer_model_not_inner_calls():
    from smoothing.runner import ForwardPassCounter

    class InTwoChunks(torch.nn.Module):  # like a denoise-then-classify in micro-batches
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Flatten()

        def forward(self, x):
            return torch.cat([self.inner(chunk) for chunk in x.split(3)])

    model = InTwoChunks()
    with ForwardPassCounter(model) as counter:
        model(torch.zeros(5, 1, 2, 2))
        model(torch.zeros(1, 1, 2, 2))
    model(torch.zeros(4, 1, 2, 2))  # the hook is gone
    assert counter.count == 6


def test_run_settings_refuse_certify_options_for_predict():
    from smoothing.runner import RunSettings

    for extra in ({"early_exit": True}, {"radii": (0.0, 0.5)}):
        with pytest.raises(ValueError, match="certify only"):
            RunSettings("predict", n=100, alpha=0.001, batch_size=100, **extra)
    with pytest.raises(ValueError, match="strictly increasing"):
        RunSettings("certify", n=100, alpha=0.001, batch_size=100, radii=(0.5, 0.25))
