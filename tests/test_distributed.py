"""torchrun: one shard per rank, merged by rank 0 into the rows of a one-process run.

The merge and its refusals are tested in-process on result files written through
ResultFile; the commands themselves run as 2 CPU processes (gloo) started by torchrun
(`python -m torch.distributed.run`, which is what the `torchrun` script calls), or, where
the ranks must be started with different arguments, as two processes given torchrun's
environment by hand.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from smoothing.runner import ResultFile, ResultFileError
from smoothing.shards import (
    check_foreign_shards,
    merge_results,
    merge_shards,
    shard_indices,
    shard_stem,
)
from tests.cli_helpers import invoke, rows, sidecar

BIN = Path(sys.executable).parent
# digits, a few examples spread over the test split, small n: seconds per command
SMALL = ("--n", "40", "--batch", "40", "--skip", "45", "--quiet", "--threads", "1")
SETTINGS = {"model": "toy", "sigma": 0.5, "n": 10, "seed": 0}


# ---------------------------------------------------------------- merge, in process


def test_shares_partition_the_selection_round_robin():
    indices = [3, 8, 13, 18, 23]
    assert shard_indices(indices, 0, 2) == [3, 13, 23]
    assert shard_indices(indices, 1, 2) == [8, 18]
    assert shard_indices(indices, 2, 3) == [13]
    assert shard_indices([4], 1, 2) == []  # more ranks than examples: an empty shard
    assert shard_stem(Path("runs/c0.25"), 1, 4) == Path("runs/c0.25.rank1-of-4")
    with pytest.raises(ValueError):
        shard_indices(indices, 2, 2)


def _write(stem: Path, indices, *, world=2, rank=0, settings=SETTINGS, finished=True):
    """A certify result with rows whose values are a function of idx (so a test knows them)."""
    result = ResultFile(stem, "certify", dict(settings))
    result.open({"distributed": {"rank": rank, "world_size": world}})
    for index in indices:
        result.append({"idx": index, "label": index % 10, "predict": index % 10,
                       "radius": f"{index / 100:.6f}", "correct": 1, "time": "0.5"})
    result.close(finished=finished)
    return result


def test_merge_writes_the_rows_of_all_shards_in_index_order(tmp_path):
    stem = tmp_path / "out"
    _write(shard_stem(stem, 0, 2), [0, 10, 20], rank=0)
    _write(shard_stem(stem, 1, 2), [5, 15], rank=1)
    merged = merge_shards(stem, "certify", SETTINGS, 2)
    table = rows(stem)
    assert list(table[0]) == ["idx", "label", "predict", "radius", "correct", "time"]
    assert [row["idx"] for row in table] == ["0", "5", "10", "15", "20"]
    assert list(table[1].values()) == ["5", "5", "5", "0.050000", "1", "0.5"]
    record = sidecar(stem)
    assert record["world_size"] == 2 and record["rows"] == 5 and record["finished"]
    assert [s["file"] for s in record["merged_from"]] == ["out.rank0-of-2.tsv",
                                                          "out.rank1-of-2.tsv"]
    assert record["settings"]["n"] == 10 and merged.tsv == tmp_path / "out.tsv"
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*merging*"))
    # merged again (a rerun): the same rows, once each
    merge_shards(stem, "certify", SETTINGS, 2)
    assert rows(stem) == table


def test_a_shard_of_other_settings_is_refused_by_name_and_nothing_is_written(tmp_path):
    stem = tmp_path / "out"
    _write(shard_stem(stem, 0, 2), [0, 10], rank=0)
    _write(shard_stem(stem, 1, 2), [5], rank=1, settings={**SETTINGS, "n": 20})
    with pytest.raises(ResultFileError, match=r"out\.rank1-of-2\.tsv was made with other "
                                              r"settings \(n: 20 -> 10\)"):
        merge_shards(stem, "certify", SETTINGS, 2)
    assert not (tmp_path / "out.tsv").exists() and not (tmp_path / "out.json").exists()


def test_shards_of_another_world_size_are_refused_by_name(tmp_path):
    stem = tmp_path / "out"
    _write(shard_stem(stem, 0, 2), [0], rank=0)
    _write(shard_stem(stem, 1, 2), [5], rank=1)
    _write(shard_stem(stem, 2, 3), [7], rank=2, world=3)
    with pytest.raises(ResultFileError, match=r"out\.rank2-of-3\.tsv is a shard of a run over "
                                              r"3 processes, this run has 2"):
        merge_shards(stem, "certify", SETTINGS, 2)
    with pytest.raises(ResultFileError, match="rank2-of-3"):
        check_foreign_shards(stem, 2)
    with pytest.raises(ResultFileError, match=r"out\.rank0-of-2\.tsv is a shard of a run "
                                              r"over 2 processes, this run has 3"):
        check_foreign_shards(stem, 3)
    (tmp_path / "out.rank2-of-3.tsv").unlink()
    (tmp_path / "out.rank2-of-3.json").unlink()
    # a shard file whose sidecar says another world size (renamed by hand) is refused too
    _write(tmp_path / "other.rank0-of-2", [0], rank=0, world=4)
    _write(tmp_path / "other.rank1-of-2", [1], rank=1, world=2)
    with pytest.raises(ResultFileError, match=r"other\.rank0-of-2\.tsv was written by a run "
                                              r"over 4 processes, not 2"):
        merge_shards(tmp_path / "other", "certify", SETTINGS, 2)
    assert not (tmp_path / "out.tsv").exists() and not (tmp_path / "other.tsv").exists()


def test_an_unfinished_or_missing_shard_is_not_merged(tmp_path):
    stem = tmp_path / "out"
    _write(shard_stem(stem, 0, 2), [0, 10], rank=0)
    with pytest.raises(ResultFileError, match=r"out\.rank1-of-2\.tsv .* is missing"):
        merge_shards(stem, "certify", SETTINGS, 2)
    _write(shard_stem(stem, 1, 2), [5], rank=1, finished=False)
    with pytest.raises(ResultFileError, match=r"out\.rank1-of-2\.tsv is not finished \(1 rows\)"):
        merge_shards(stem, "certify", SETTINGS, 2)
    assert not (tmp_path / "out.tsv").exists()


def test_two_sources_disagreeing_on_an_example_are_refused(tmp_path):
    _write(tmp_path / "a", [0, 1], world=None)
    other = ResultFile(tmp_path / "b", "certify", dict(SETTINGS))
    other.open({})
    other.append({"idx": 1, "label": 1, "predict": 2, "radius": "0.5", "correct": 0,
                  "time": "1"})
    other.close(finished=True)
    with pytest.raises(ResultFileError, match=r"idx 1 has different rows in a\.tsv and b\.tsv"):
        merge_results(tmp_path / "out", [tmp_path / "a", tmp_path / "b"], "certify", SETTINGS)
    assert not (tmp_path / "out.tsv").exists()


def test_job_array_results_merge_in_index_order_keeping_overlaps_once(tmp_path):
    # e.g. two array tasks over --start 0/1 --skip 2, and a third that redid example 2
    _write(tmp_path / "task0", [0, 2, 4], world=None)
    _write(tmp_path / "task1", [1, 3], world=None)
    _write(tmp_path / "task2", [2], world=None)
    merge_results(tmp_path / "all", [tmp_path / f"task{i}" for i in range(3)], "certify",
                  SETTINGS)
    assert [row["idx"] for row in rows(tmp_path / "all")] == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------- the commands, 2 processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment() -> dict[str, str]:
    # one thread per rank: two ranks share this machine's cores with other work
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # `--` ends torchrun's options: its parser would read --n, --max, --start as its own
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--",
         str(BIN / command), *args],
        cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=300,
    )


def one_process(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *args], cwd=cwd, env=_environment(),
                          capture_output=True, text=True, timeout=300)


def _assert_ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [
    ("certify", ("--n0", "10")),
    ("predict", ()),
    ("attack", ("--sigma", "0.25", "--eps", "0.5", "--steps", "2", "--m-test", "4")),
])
def test_two_ranks_give_the_rows_of_one_process_and_resume(tmp_path, command, extra):
    _assert_ok(one_process(command, *SMALL, *extra, "--out", "single", cwd=tmp_path))
    _assert_ok(torchrun(command, *SMALL, *extra, "--out", "runs/many", cwd=tmp_path))
    single, many = tmp_path / "single", tmp_path / "runs" / "many"
    assert len(rows(single)) == 10  # 450 test images, every 45th: 10 examples
    assert rows(many, without_time=True) == rows(single, without_time=True)
    record = sidecar(many)
    assert record["world_size"] == 2 and record["rows"] == 10
    assert [s["rows"] for s in record["merged_from"]] == [5, 5]
    assert record["settings"] == sidecar(single)["settings"]
    shard1 = tmp_path / "runs" / "many.rank1-of-2"
    assert [row["idx"] for row in rows(shard1)] == [row["idx"] for row in rows(single)[1::2]]

    # A rerun resumes both shards (nothing left to compute) and merges again.
    rows_before = (tmp_path / "runs" / "many.rank1-of-2.tsv").read_text()
    _assert_ok(torchrun(command, *SMALL, *extra, "--out", "runs/many", cwd=tmp_path))
    assert (tmp_path / "runs" / "many.rank1-of-2.tsv").read_text() == rows_before
    shard_record = sidecar(shard1)
    assert len(shard_record["resumed"]) == 1
    assert rows(many, without_time=True) == rows(single, without_time=True)


@pytest.mark.slow
def test_two_nodes_meeting_at_a_c10d_rendezvous_give_the_rows_of_one_process(tmp_path):
    # Two torchrun agents, one process each, as on two nodes of a cluster (both here, so
    # the file system is shared, as --out must be): each process gets its global RANK from
    # the rendezvous and LOCAL_RANK 0 on its node.
    _assert_ok(one_process("certify", *SMALL, "--n0", "10", "--out", "single", cwd=tmp_path))
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--",
         str(BIN / "certify"), *SMALL, "--n0", "10", "--out", "runs/many"],
        cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for _ in range(2)]
    for agent in agents:
        _, stderr = agent.communicate(timeout=300)
        assert agent.returncode == 0, stderr[-3000:]
    many = tmp_path / "runs" / "many"
    assert rows(many, without_time=True) == rows(tmp_path / "single", without_time=True)
    shards = [sidecar(tmp_path / "runs" / f"many.rank{r}-of-2")["distributed"] for r in (0, 1)]
    assert [(s["rank"], s["local_rank"], s["world_size"]) for s in shards] == [(0, 0, 2),
                                                                            (1, 0, 2)]
    assert sidecar(many)["world_size"] == 2


@pytest.mark.slow
def test_a_rank_killed_mid_run_resumes_its_shard_and_the_merge_is_redone(tmp_path):
    _assert_ok(one_process("certify", *SMALL, "--out", "single", cwd=tmp_path))
    _assert_ok(torchrun("certify", *SMALL, "--out", "many", cwd=tmp_path))
    # What a SIGKILL of rank 1 after 3 of its 5 rows leaves: flushed rows, half a row, no
    # `finished` (and no merged file yet).
    shard_tsv, shard_json = tmp_path / "many.rank1-of-2.tsv", tmp_path / "many.rank1-of-2.json"
    lines = shard_tsv.read_text().splitlines(keepends=True)
    shard_tsv.write_text("".join(lines[:4]) + lines[4][:5])
    record = json.loads(shard_json.read_text())
    record["finished"] = None
    shard_json.write_text(json.dumps(record))
    (tmp_path / "many.tsv").unlink()
    (tmp_path / "many.json").unlink()
    rank0_rows = (tmp_path / "many.rank0-of-2.tsv").read_text()

    _assert_ok(torchrun("certify", *SMALL, "--out", "many", cwd=tmp_path))
    assert (rows(tmp_path / "many", without_time=True)
            == rows(tmp_path / "single", without_time=True))
    assert (tmp_path / "many.rank0-of-2.tsv").read_text() == rank0_rows  # nothing redone
    resumed = shard_tsv.read_text()
    assert resumed.startswith("".join(lines[:4])) and len(resumed.splitlines()) == 6


@pytest.mark.slow
def test_analyze_reads_a_merged_file_like_a_one_process_one(tmp_path):
    _assert_ok(one_process("certify", *SMALL, "--out", "single", cwd=tmp_path))
    _assert_ok(torchrun("certify", *SMALL, "--out", "many", cwd=tmp_path))
    outputs = []
    for name in ("single", "many"):
        done = one_process("analyze", f"{name}.tsv", "--format", "json", cwd=tmp_path)
        _assert_ok(done)
        (summary,) = json.loads(done.stdout)
        assert summary.pop("file") == f"{name}.tsv"
        outputs.append(summary)
    assert outputs[0] == outputs[1]
    assert outputs[0]["n"] == 10


def _start_rank(rank: int, port: int, args: list[str], cwd: Path) -> subprocess.Popen:
    environment = {**_environment(), "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
    return subprocess.Popen([str(BIN / "certify"), *args], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_rank_with_other_settings_is_refused_on_every_rank_before_any_file(tmp_path):
    port = _free_port()
    common = [*SMALL, "--out", "out/many"]
    ranks = [_start_rank(0, port, [*common, "--n0", "10"], tmp_path),
             _start_rank(1, port, [*common, "--n0", "20"], tmp_path)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    for rank, (_, stderr) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 2, stderr
        assert "rank 1 (of ranks [1]) was started with other settings than rank 0 " \
               "(settings.n0: 10 on rank 0, 20 there)" in stderr
        assert stderr.count("Error:") == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- merge-results (job arrays)


def test_merge_results_joins_job_array_tasks_into_the_rows_of_one_run(tmp_path):
    import torch

    from cli.main import certify_command
    from cli.merge import merge_command

    torch.set_num_threads(1)
    base = ["--n", "40", "--n0", "10", "--batch", "40", "--quiet"]
    assert invoke(certify_command, *base, "--skip", "45", "--out",
                  str(tmp_path / "single")).exit_code == 0
    # two array tasks: --start 0 and 45, --skip 90 (what $SLURM_ARRAY_TASK_ID would set)
    for task, start in enumerate((0, 45)):
        done = invoke(certify_command, *base, "--start", str(start), "--skip", "90", "--out",
                      str(tmp_path / f"task{task}"))
        assert done.exit_code == 0, done.output
    done = invoke(merge_command, str(tmp_path / "all"), str(tmp_path / "task1.tsv"),
                  str(tmp_path / "task0.tsv"))
    assert done.exit_code == 0, done.output
    assert "10 rows from 2 files" in done.output
    assert (rows(tmp_path / "all", without_time=True)
            == rows(tmp_path / "single", without_time=True))
    record = sidecar(tmp_path / "all")
    assert [s["selection"]["start"] for s in record["merged_from"]] == [45, 0]
    single = sidecar(tmp_path / "single")
    assert record["settings"] == single["settings"]
    # the forward passes of the rows carry over: n0 + n per certify row, as in one run
    assert record["forward_passes"] == single["forward_passes"] == 10 * (10 + 40)
    assert record["forward_passes_uncounted_rows"] == 0

    # a task run with other settings is refused, naming it; nothing is written
    assert invoke(certify_command, *base[:1], "50", *base[2:], "--start", "1", "--skip",
                  "90", "--out", str(tmp_path / "other")).exit_code == 0
    before = (tmp_path / "all.tsv").read_text()
    done = invoke(merge_command, str(tmp_path / "again"), str(tmp_path / "task0.tsv"),
                  str(tmp_path / "other.tsv"))
    assert done.exit_code == 2
    assert "other.tsv was made with other settings (n: 50 -> 40)" in done.output
    assert not (tmp_path / "again.tsv").exists() and not (tmp_path / "again.json").exists()
    assert (tmp_path / "all.tsv").read_text() == before


def test_merge_results_refuses_files_it_cannot_vouch_for(tmp_path):
    from cli.merge import merge_command

    cohen = tmp_path / "cohen.tsv"  # the reference implementation writes no settings file
    cohen.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:01\n")
    done = invoke(merge_command, str(tmp_path / "out"), str(cohen))
    assert done.exit_code == 2 and "cohen.tsv has no settings file (cohen.json)" in done.output
    _write(tmp_path / "a", [0], world=None)
    done = invoke(merge_command, str(tmp_path / "a.tsv"), str(tmp_path / "a.tsv"))
    assert done.exit_code == 2 and "is also one of the FILEs" in done.output
    _write(tmp_path / "b", [1], world=None, finished=False)
    done = invoke(merge_command, str(tmp_path / "out"), str(tmp_path / "a.tsv"),
                  str(tmp_path / "b.tsv"))
    assert done.exit_code == 2 and "b.tsv is not finished (1 rows)" in done.output
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------- start-up refusals, 1 rank


@pytest.fixture
def one_rank(monkeypatch):
    """This process as rank 0 of a torchrun of one (the group is set up in-process)."""
    import torch.distributed as dist

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    yield
    initialized = dist.is_initialized()
    if initialized:
        dist.destroy_process_group()
    assert not initialized, "the command left its process group behind"


def test_result_files_that_would_be_refused_stop_the_run_before_any_work(tmp_path, monkeypatch,
                                                                         one_rank):
    import torch

    from cli.main import certify_command
    from smoothing.core import Smooth

    torch.set_num_threads(1)
    base = ["--n", "40", "--n0", "10", "--batch", "40", "--quiet", "--max", "2"]
    with monkeypatch.context() as unlaunched:  # a one-process run into OUT first
        unlaunched.delenv("RANK")
        assert invoke(certify_command, *base, "--out", str(tmp_path / "out")).exit_code == 0
    before = (tmp_path / "out.tsv").read_bytes()
    calls = []
    monkeypatch.setattr(Smooth, "certify", lambda *a, **k: calls.append(1))
    done = invoke(certify_command, *base[:1], "50", *base[2:], "--out", str(tmp_path / "out"))
    assert done.exit_code == 2
    assert "rank 0: " in done.output and "out.tsv was made with other settings (n: 40 -> 50)" \
        in done.output
    assert (tmp_path / "out.tsv").read_bytes() == before and calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.tsv"]

    # shards of a run over 3 processes lie beside OUT: refused by name before any work
    _write(tmp_path / "other.rank2-of-3", [4], rank=2, world=3)
    done = invoke(certify_command, *base, "--out", str(tmp_path / "other"))
    assert done.exit_code == 2
    assert "other.rank2-of-3.tsv is a shard of a run over 3 processes, this run has 1" \
        in done.output
    assert calls == [] and not (tmp_path / "other.tsv").exists()
    assert not (tmp_path / "other.rank0-of-1.tsv").exists()


def test_one_rank_of_one_writes_its_shard_and_the_merged_rows_of_a_plain_run(tmp_path,
                                                                           monkeypatch,
                                                                           one_rank):
    import torch

    from cli.main import predict_command

    torch.set_num_threads(1)
    base = ["--n", "40", "--batch", "40", "--quiet", "--max", "3"]
    with monkeypatch.context() as unlaunched:
        unlaunched.delenv("RANK")
        assert invoke(predict_command, *base, "--out", str(tmp_path / "plain")).exit_code == 0
    done = invoke(predict_command, *base, "--out", str(tmp_path / "ranked"))
    assert done.exit_code == 0, done.output
    assert "wrote " + str(tmp_path / "ranked.tsv") + " (3 rows)" in done.output
    plain = rows(tmp_path / "plain", without_time=True)
    assert rows(tmp_path / "ranked", without_time=True) == plain
    assert rows(tmp_path / "ranked.rank0-of-1", without_time=True) == plain


def test_a_rank_without_a_gpu_of_its_own_is_refused_by_name(monkeypatch):
    import torch

    from cli.distributed import ProcessGroup
    from cli.errors import CommandError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    group = ProcessGroup(rank=5, world_size=6, local_rank=1)
    assert group.device("auto") == "cuda:1" and group.device("cuda") == "cuda:1"
    assert group.device("cpu") == "cpu" and group.device("cuda:0") == "cuda:0"
    with pytest.raises(CommandError, match="rank 5 has LOCAL_RANK 2, but this node has 2"):
        ProcessGroup(rank=5, world_size=6, local_rank=2).device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ProcessGroup(rank=5, world_size=6, local_rank=2).device("auto") == "auto"
