"""Result files nobody can lose or double-count: locking, duplicate rows, early failures,
read-only files and provenance (issue 10)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest
import torch

from classifiers.digits import weights_path
from cli.main import certify_command
from smoothing.analysis import load_results
from smoothing.core import Smooth
from smoothing.runner import ResultFile, ResultFileError, RunSettings, example_seed, run
from tests.cli_helpers import invoke, sidecar
from tests.test_runner import SETTINGS, Linear, certify_all, make_dataset

REPO = Path(__file__).resolve().parent.parent
FAST = ["--n0", "20", "--n", "100", "--batch", "100", "--max", "2", "--quiet"]


def opened(stem: Path) -> ResultFile:
    results = ResultFile(stem, "certify", {"case": "linear", **SETTINGS})
    results.open({})
    return results


# --- concurrent writers ------------------------------------------------------------------


def test_a_second_writer_in_the_same_process_is_refused_naming_the_holder(tmp_path):
    # flock locks belong to an open file description: two opens conflict even in one process
    first = opened(tmp_path / "run")
    with pytest.raises(ResultFileError) as refused:
        opened(tmp_path / "run")
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "started" in message
    first.close(finished=False)
    opened(tmp_path / "run").close(finished=False)  # released: the next writer gets it
    assert not (tmp_path / "run.lock").exists()


def test_the_refused_writer_changes_nothing(tmp_path):
    certify_all(tmp_path / "run", indices=[0, 1])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    holder = opened(tmp_path / "run")
    with pytest.raises(ResultFileError, match="another process"):
        certify_all(tmp_path / "run")
    holder.close(finished=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before


def test_other_out_stems_in_one_folder_are_not_blocked(tmp_path):
    # parallel shards write one --out each: the lock is per result, not per folder
    shard0 = opened(tmp_path / "shard0")
    opened(tmp_path / "shard1").close(finished=False)
    shard0.close(finished=False)


def test_the_lock_does_not_outlive_a_finished_run(tmp_path):
    dataset = make_dataset()
    results = ResultFile(tmp_path / "run", "certify", {"case": "linear", **SETTINGS})
    run(Smooth(Linear(), 2, sigma=0.25), dataset, range(3), results,
        RunSettings(**SETTINGS), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.tsv"]


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from smoothing.runner import ResultFile
    results = ResultFile(Path(sys.argv[1]), "certify", {"case": "linear"})
    results.open({})
    print("locked", flush=True)
    time.sleep(600)
""")


@contextmanager
def holder_process(stem: Path):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(stem)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_another_process_holding_the_lock_refuses_the_cli_and_sigkill_releases_it(tmp_path):
    stem = tmp_path / "run"
    with holder_process(stem) as process:
        refused = invoke(certify_command, *FAST, "--out", str(stem))
        assert refused.exit_code == 2, refused.output
        assert f"pid {process.pid}" in refused.output
        assert not (tmp_path / "run.tsv").exists() and not (tmp_path / "run.json").exists()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    # the killed holder left its lock file, but the kernel dropped its lock
    assert (tmp_path / "run.lock").exists()
    result = invoke(certify_command, *FAST, "--out", str(stem))
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "run.tsv").read_text().splitlines()) == 1 + 2


# --- duplicate rows ----------------------------------------------------------------------


def test_resume_refuses_a_tsv_with_a_repeated_idx(tmp_path):
    results = certify_all(tmp_path / "run", indices=[0, 1])
    header, first, second = results.tsv.read_text().splitlines()
    results.tsv.write_text("\n".join([header, first, second, first]) + "\n")
    before = results.sidecar.read_bytes()
    with pytest.raises(ResultFileError, match="line 4: idx 0 already appears on line 2"):
        certify_all(tmp_path / "run")
    assert results.sidecar.read_bytes() == before


# --- a run that fails before its first row -----------------------------------------------


class Broken(torch.nn.Module):
    """A model that does not fit the data: it fails on the first forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def test_a_run_failing_before_its_first_row_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="shapes"):
        certify_all(tmp_path / "run", model=Broken())
    assert list(tmp_path.iterdir()) == []
    certify_all(tmp_path / "run")  # the corrected rerun is not "made with other settings"
    assert len(load_results(tmp_path / "run.tsv").idx) == 8


def test_an_early_failure_never_touches_files_that_existed(tmp_path):
    certify_all(tmp_path / "run", indices=[0, 1])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        certify_all(tmp_path / "run", model=Broken())  # resume
    with pytest.raises(RuntimeError):
        certify_all(tmp_path / "run", model=Broken(), overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_negative_seeds_are_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        example_seed(-1, 0)
    with pytest.raises(ValueError, match="seed"):
        RunSettings(**{**SETTINGS, "seed": -1})
    result = invoke(certify_command, *FAST, "--seed", "-1", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--seed" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_missing_checkpoint_leaves_no_file(tmp_path):
    result = invoke(certify_command, *FAST,
                    "--classifier-weights", str(tmp_path / "missing.safetensors"),
                    "--out", str(tmp_path / "out" / "run"))
    assert result.exit_code == 2 and "no such file" in result.output
    assert not (tmp_path / "out").exists()


# --- a read-only TSV ---------------------------------------------------------------------


@contextmanager
def read_only(path: Path):
    path.chmod(0o444)
    immutable = os.geteuid() == 0  # root writes through mode bits: make it immutable
    if immutable and subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        path.chmod(0o644)
        pytest.skip("running as root without chattr: cannot make a file read-only")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o644)


def test_a_read_only_tsv_is_refused_before_anything_changes(tmp_path):
    certify_all(tmp_path / "run", indices=[0, 1])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with read_only(tmp_path / "run.tsv"):
        with pytest.raises(ResultFileError, match="run.tsv is not writable"):
            certify_all(tmp_path / "run")
        with pytest.raises(ResultFileError, match="not writable"):
            certify_all(tmp_path / "run", overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- provenance --------------------------------------------------------------------------


def test_resume_keeps_the_history_of_versions(tmp_path):
    certify_all(tmp_path / "run", indices=[0, 1])
    certify_all(tmp_path / "run", indices=[0, 1, 2])
    record = sidecar(tmp_path / "run")
    history = record["versions_history"]
    assert len(history) == 2 and len(record["resumed"]) == 1
    assert [entry["versions"]["torch"] for entry in history] == [metadata.version("torch")] * 2
    assert history[1]["time"] == record["resumed"][0]


def test_rows_from_another_torch_are_not_mixed_in(tmp_path):
    certify_all(tmp_path / "run", indices=[0, 1])
    record = sidecar(tmp_path / "run")
    record["versions"]["torch"] = "1.13.0"
    (tmp_path / "run.json").write_text(json.dumps(record))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ResultFileError, match="torch 1.13.0"):
        certify_all(tmp_path / "run")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    certify_all(tmp_path / "run", overwrite=True)
    record = sidecar(tmp_path / "run")
    assert record["versions"]["torch"] == metadata.version("torch")
    assert len(record["versions_history"]) == 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_json_records_libraries_device_commit_and_weights(tmp_path):
    result = invoke(certify_command, *FAST, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    record = sidecar(tmp_path / "run")
    versions = record["versions"]
    for name in ("torchvision", "diffusers", "transformers", "open_clip_torch", "peft",
                 "scikit-learn"):
        assert versions[name] == metadata.version(name)
    assert record["device_name"] and record["versions_history"][0]["device_name"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)
    shipped = weights_path(0.25)
    assert record["weights_sha256"] == {
        "classifier": {str(shipped): sha256(shipped)}, "denoiser": None,
    }


@pytest.mark.slow
def test_the_digits_ddpm_files_are_hashed(tmp_path):
    result = invoke(certify_command, *FAST, "--max", "1", "--n", "20", "--n0", "10",
                    "--denoiser", "dds", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    digests = sidecar(tmp_path / "run")["weights_sha256"]["denoiser"]
    folder = REPO / "denoisers" / "weights" / "digits_ddpm"
    expected = [folder / "unet" / "config.json", folder / "scheduler" / "scheduler_config.json",
                folder / "unet" / "diffusion_pytorch_model.safetensors"]
    assert {Path(k).resolve(): v for k, v in digests.items()} == {
        p.resolve(): sha256(p) for p in expected
    }


def test_no_commit_is_recorded_outside_a_checkout_or_without_git(monkeypatch):
    import cli.main

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(cli.main.subprocess, "run", no_git)
    assert cli.main._git_commit() is None


def test_no_commit_is_recorded_for_a_copy_inside_another_repository(monkeypatch):
    import cli.main

    def other_repository(args, **kwargs):
        return subprocess.CompletedProcess(args, 0, "/home/user/project\n" + "a" * 40 + "\n", "")

    monkeypatch.setattr(cli.main.subprocess, "run", other_repository)
    assert cli.main._git_commit() is None


def test_no_commit_is_recorded_outside_a_checkout(monkeypatch):
    import cli.main

    def not_a_checkout(args, **kwargs):
        return subprocess.CompletedProcess(args, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(cli.main.subprocess, "run", not_a_checkout)
    assert cli.main._git_commit() is None


def test_a_model_that_names_no_weight_files_records_null():
    from cli.main import _weight_digests

    assert _weight_digests(Linear()) is None and _weight_digests(None) is None


@pytest.mark.slow
def test_two_certify_processes_on_one_out(tmp_path):
    # the case: the same command twice, or shards --start 0/1 --skip 2 on one --out
    stem = tmp_path / "run"
    command = [sys.executable, "-c", "from cli.main import certify_command; certify_command()",
               "--n0", "10", "--batch", "100", "--max", "1", "--quiet", "--out", str(stem)]
    first = subprocess.Popen([*command, "--n", "1000000", "--start", "0", "--skip", "2"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lock = tmp_path / "run.lock"
        for _ in range(600):
            if lock.exists() and lock.read_text().strip():
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = subprocess.run([*command, "--n", "1000000", "--start", "1", "--skip", "2"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "another process" in second.stderr
    finally:
        first.kill()
        first.wait(timeout=30)
