"""The `attack` command (issue 8, section 3): result contract, resume, refusals, and the
consistency of its empirical numbers with certify's certificates on the digits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from scipy.stats import binom

from cli.attack import attack_command, parse_eps
from cli.main import certify_command, predict_command
from tests.cli_helpers import invoke, rows, sidecar

REPO = Path(__file__).resolve().parent.parent
BASE = ["--model", "digits-sigma0.25", "--quiet", "--threads", "1"]
SMOOTHED = [*BASE, "--sigma", "0.25"]
COLUMNS = "idx\tlabel\tpredict\tcorrect\ttime\tclean_predict\tclean_correct\tl2\tlinf"


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads 1 sets it for the process


def attack(*args: str):
    return invoke(attack_command, *args)


# ------------------------------------------------------------------------- the contract


def test_pgd_rows_and_json_follow_the_contract(tmp_path):
    out = tmp_path / "pgd"
    result = attack(*BASE, "--eps", "0.5", "--steps", "5", "--max", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pgd.tsv").read_text().splitlines()[0] == COLUMNS
    table = rows(out)
    assert [int(r["idx"]) for r in table] == [0, 1, 2]
    for row in table:
        assert int(row["correct"]) == int(int(row["predict"]) == int(row["label"]))
        assert int(row["clean_correct"]) == int(int(row["clean_predict"]) == int(row["label"]))
        assert len(row["l2"].split(".")[1]) == 6 and float(row["l2"]) <= 0.5 * (1 + 1e-5)
        assert 0 < float(row["linf"]) <= float(row["l2"])
    record = sidecar(out)
    settings = record["settings"]
    assert record["mode"] == "attack"
    assert {k: settings[k] for k in ("attack", "norm", "eps", "sigma", "n", "alpha", "m_test",
                                     "steps", "restarts", "seed", "model", "dataset")} == {
        "attack": "pgd", "norm": "l2", "eps": 0.5, "sigma": None, "n": None, "alpha": None,
        "m_test": None, "steps": 5, "restarts": 1, "seed": 0, "model": "digits-sigma0.25",
        "dataset": "digits",
    }
    assert settings["step_size"] == 4 / 3 * 0.5 / 5
    assert record["weights_sha256"]["classifier"]  # the model's provenance, as certify's
    assert "digits test" not in result.output and "empirical robust accuracy" in result.output


def test_smoothadv_is_the_default_with_sigma_and_records_predicts_settings(tmp_path):
    out = tmp_path / "smooth"
    result = attack(*SMOOTHED, "--eps", "0.5", "--steps", "3", "--m-test", "8", "--max", "2",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    settings = sidecar(out)["settings"]
    assert (settings["attack"], settings["sigma"], settings["n"], settings["alpha"],
            settings["m_test"]) == ("smoothadv", 0.25, 100, 0.001, 8)
    assert "abstained" in result.output


def test_attack_none_clean_columns_equal_predicts_rows(tmp_path):
    common = ["--sigma", "0.25", "--n", "100", "--max", "8", "--seed", "3"]
    predicted = invoke(predict_command, *BASE, *common, "--out", str(tmp_path / "predict"))
    assert predicted.exit_code == 0, predicted.output
    result = attack(*BASE, *common, "--attack", "none", "--out", str(tmp_path / "none"))
    assert result.exit_code == 0, result.output
    expected = rows(tmp_path / "predict")
    got = rows(tmp_path / "none")
    assert [(r["idx"], r["predict"], r["clean_correct"]) for r in expected] == [
        (r["idx"], r["clean_predict"], r["clean_correct"]) for r in got
    ]
    assert all(r["l2"] == r["linf"] == "0.000000" for r in got)
    settings = sidecar(tmp_path / "none")["settings"]
    assert (settings["attack"], settings["norm"], settings["eps"]) == ("none", None, None)


def test_eps_is_read_exactly():
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps("0.5") == 0.5 and parse_eps("1e-2") == 0.01 and parse_eps(" 2/3 ") == 2 / 3
    # 0.1 + 0.2 in floats is not 0.3; read as a fraction first, "3/10" is the float 0.3
    assert parse_eps("3/10") == 0.3


def test_linf_eps_as_a_fraction_is_recorded_as_typed(tmp_path):
    out = tmp_path / "linf"
    result = attack(*BASE, "--norm", "linf", "--eps", "8/255", "--steps", "3", "--max", "1",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    settings = sidecar(out)["settings"]
    assert settings["eps"] == 8 / 255 and settings["eps_text"] == "8/255"
    (row,) = rows(out)
    assert 0 < float(row["linf"]) - 8 / 255 <= 1e-6 + 8 / 255 * 1e-5  # rounded up, at eps


# ------------------------------------------------------------------------------ resume


def test_a_resumed_run_gives_the_rows_of_an_uninterrupted_one(tmp_path):
    args = [*SMOOTHED, "--eps", "0.5", "--steps", "10", "--m-test", "8"]
    whole = tmp_path / "whole"
    assert attack(*args, "--max", "4", "--out", str(whole)).exit_code == 0
    part = tmp_path / "part"
    assert attack(*args, "--max", "2", "--out", str(part)).exit_code == 0
    result = attack(*args, "--max", "4", "--out", str(part))
    assert result.exit_code == 0, result.output
    assert rows(part, without_time=True) == rows(whole, without_time=True)
    assert len(sidecar(part)["resumed"]) == 1


KILLED_RUN = textwrap.dedent("""
    import sys
    from cli.attack import attack_command
    attack_command(sys.argv[1:])
""")


@pytest.mark.slow
def test_a_sigkilled_run_rerun_gives_identical_rows(tmp_path):
    args = [*SMOOTHED, "--eps", "0.5", "--steps", "100", "--max", "12"]
    stem = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *args, "--out", str(stem)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tsv = tmp_path / "killed.tsv"
    try:
        for _ in range(1200):
            if tsv.exists() and len(tsv.read_text().splitlines()) >= 1 + 2:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    kept = len(tsv.read_text().splitlines()) - 1
    assert 2 <= kept < 12  # killed mid-run
    result = attack(*args, "--out", str(stem))
    assert result.exit_code == 0, result.output
    whole = tmp_path / "whole"
    assert attack(*args, "--out", str(whole)).exit_code == 0
    assert rows(stem, without_time=True) == rows(whole, without_time=True)


def test_other_settings_are_refused_without_overwrite(tmp_path):
    out = tmp_path / "run"
    args = [*BASE, "--steps", "3", "--max", "2", "--out", str(out)]
    assert attack(*args, "--eps", "0.5").exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    refused = attack(*args, "--eps", "1.0")
    assert refused.exit_code == 2 and "other settings" in refused.output
    assert "eps: 0.5 -> 1.0" in refused.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    replaced = attack(*args, "--eps", "1.0", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert sidecar(out)["settings"]["eps"] == 1.0


# ---------------------------------------------------------------------------- bad input

NO_GRAD_MODEL = textwrap.dedent("""
    import torch
    from classifiers.digits import weights_path, load_digits_cnn

    class NoGrad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = load_digits_cnn(weights_path(0.25))

        def forward(self, x):
            with torch.no_grad():
                return self.model(x)

    def build():
        return NoGrad()
""")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eps", "0"], "must be > 0"),
        (["--eps", "-0.5"], "must be > 0"),
        (["--eps", "1/0"], "--eps"),
        (["--eps", "nan"], "--eps"),
        (["--eps", "inf"], "--eps"),
        (["--eps", "half"], "fraction such as 8/255"),
        (["--eps", "0.5", "--norm", "l1"], "'l1' is not one of"),
        (["--eps", "0.5", "--attack", "fgsm"], "'fgsm' is not one of"),
        (["--eps", "0.5", "--sigma", "0.25", "--m-test", "0"], "--m-test"),
        (["--eps", "0.5", "--steps", "0"], "--steps"),
        (["--eps", "0.5", "--restarts", "0"], "--restarts"),
        ([], "needs --eps"),
        (["--eps", "0.5", "--sigma", "0.25", "--attack", "pgd"], "use --attack smoothadv"),
        (["--eps", "0.5", "--attack", "smoothadv"], "give --sigma"),
        (["--attack", "none", "--eps", "0.5"], "--attack none takes no --eps"),
        (["--eps", "0.5", "--n", "1000"], "need --sigma"),
        (["--eps", "0.5", "--m-test", "8"], "need --sigma"),
        (["--eps", "0.5", "--denoiser", "dds"], "--denoiser needs --sigma"),
        (["--eps", "0.5", "--sigma", "0"], "--sigma"),
    ],
)
def test_bad_input_is_one_message_exit_2_and_writes_nothing(tmp_path, args, message):
    result = attack(*BASE, *args, "--max", "1", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_input_gradients_is_refused_before_any_file(tmp_path):
    model_file = tmp_path / "no_grad.py"
    model_file.write_text(NO_GRAD_MODEL)
    out = tmp_path / "out" / "run"
    result = attack("--model", f"{model_file}:build", "--eps", "0.5", "--max", "1", "--quiet",
                    "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "needs input gradients" in result.output and "no_grad" in result.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    # without an attack it needs no gradient: --attack none runs
    result = attack("--model", f"{model_file}:build", "--attack", "none", "--max", "1",
                    "--quiet", "--out", str(out))
    assert result.exit_code == 0, result.output


def test_autoattack_names_are_offered(tmp_path):
    result = attack("--help")
    assert result.exit_code == 0
    for name in ("apgd-ce", "apgd-t", "autoattack", "autoattack-rand"):
        assert name in result.output


@pytest.mark.parametrize("name", ["apgd-ce", "autoattack"])
def test_autoattack_without_its_library_is_one_message_and_writes_nothing(
    tmp_path, monkeypatch, name
):
    # None in sys.modules makes `import autoattack` (pyautoattack's package) fail
    monkeypatch.setitem(sys.modules, "autoattack", None)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    result = attack(*BASE, "--attack", name, "--eps", "0.5", "--max", "1",
                    "--out", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "autoattack" in result.output.lower() and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------- the two halves of the toolkit agree (digits)

ALPHA = 0.001


def allowed_violations(certified: int) -> int:
    """The smallest k with P(Binomial(certified, 2 alpha) > k) <= 1e-3 (see below)."""
    return int(binom.isf(1e-3, certified, 2 * ALPHA)) if certified else 0


@pytest.mark.slow
def test_smoothadv_at_eps_never_beats_certify_above_eps_on_the_digits(tmp_path):
    # If CERTIFY (alpha) certifies x with its label at a radius R > eps, then with
    # probability >= 1 - alpha the smoothed classifier is right on the whole eps-ball, and
    # PREDICT (alpha) on any point there returns a wrong class with probability <= alpha
    # (Cohen et al. 2019, Thm. 2, Prop. 1). So after any attack within eps such an example
    # is a wrong, non-abstained PREDICT with probability <= 2 alpha, independently across
    # examples (each its own streams). More violations than Binomial(N, 2 alpha) allows at
    # level 1e-3 mean the certificate, PREDICT or the attack's threat model is wrong.
    eps = 0.25
    selection = ["--skip", "5", "--max", "90", "--seed", "0"]
    certified = tmp_path / "certify"
    result = invoke(certify_command, *SMOOTHED, *selection, "--n", "10000",
                    "--out", str(certified))
    assert result.exit_code == 0, result.output
    attacked = tmp_path / "attack"
    result = attack(*SMOOTHED, *selection, "--eps", str(eps), "--out", str(attacked))
    assert result.exit_code == 0, result.output
    certificates = {r["idx"]: r for r in rows(certified)}
    above = [r for r in rows(attacked)
             if certificates[r["idx"]]["correct"] == "1"
             and float(certificates[r["idx"]]["radius"]) > eps]
    violations = sum(int(r["predict"]) not in (-1, int(r["label"])) for r in above)
    assert len(above) >= 60  # the check is not vacuous
    assert violations <= allowed_violations(len(above))
    # and the attack has teeth at this eps: the attacked examples are not all untouched
    assert all(float(r["l2"]) > 0.9 * eps for r in rows(attacked))


def test_autoattack_through_the_command_is_recorded_and_reproducible(tmp_path):
    pytest.importorskip("pyautoattack", reason="the autoattack extra (pyautoattack) is missing")
    args = ["--model", "digits-clean", "--quiet", "--threads", "1", "--max", "3",
            "--attack", "apgd-ce", "--eps", "0.5", "--steps", "10"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert attack(*args, "--out", str(first)).exit_code == 0
    assert attack(*args, "--out", str(second)).exit_code == 0
    assert rows(first, without_time=True) == rows(second, without_time=True)
    recorded = sidecar(first)["settings"]
    assert recorded["attack"] == "apgd-ce"
    assert recorded["autoattack"]["attacks_to_run"] == ["apgd-ce"]
    assert recorded["autoattack"]["n_iter"] == 10
    assert all(float(r["l2"]) <= 0.5 + 1e-6 for r in rows(first))
