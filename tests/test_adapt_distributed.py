"""`adapt personalize` and `adapt finetune` under a launcher: two CPU processes (gloo)
started by `torch.distributed.run` (torchrun; `accelerate launch --multi_gpu` runs it too),
each the `adapt` command line (tests/distributed_adapt_child.py), on the tiny IF-II and
CLIP of the other adapt tests.

What must hold: at the same global batch the two processes train what one process
trains (the same loss of the global batch at every step; the same weights to float
tolerance, see `assert_same_training`); files are written once; a batch the processes
cannot share equally is refused by every process (exit 2) with nothing written; a
SIGTERM reaching one process stops both after a checkpoint, and the rerun resumes in
both and ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_classifiers import save_tiny_clip, snapshot, write_reference_set
from tests.tiny_models import save_tiny_if2

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "distributed_adapt_child.py"

# Tests that start processes (each imports torch, diffusers, open_clip): 15-60 s each.
launched = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed_models")
    return {
        "clip_folder": folder / "clip",
        "clip": save_tiny_clip(folder / "clip"),
        "if2": save_tiny_if2(folder / "if2"),
        "references": write_reference_set(folder / "refs", ["dog", "cat"], shots=2, size=32),
        "cache": folder / "cache",
    }


def adapt(tiny, args: list, processes: int, **env: str) -> subprocess.CompletedProcess:
    """The `adapt` command line in one process, or in `processes` under the launcher."""
    launcher = [] if processes == 1 else [
        "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
    ]
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                       XDG_CACHE_HOME=str(tiny["cache"]), HF_HUB_OFFLINE="1", **env)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)  # none from the test's own process
    return subprocess.run(
        [sys.executable, *launcher, str(CHILD), str(tiny["clip_folder"]),
         *[str(a) for a in args]],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600,
    )


def personalize_args(tiny, out, batch: int = 4) -> list:
    return ["personalize", "--references", tiny["references"], "--out", out,
            "--checkpoint", tiny["if2"], "--classifier", "tiny-clip",
            "--classifier-checkpoint", tiny["clip"], "--lam", "0.5", "--steps", "3",
            "--lr", "1e-3", "--batch-size", batch, "--resolution", "32", "--device", "cpu",
            "--quiet"]


def finetune_args(tiny, out, batch: int = 2) -> list:
    # 4 references, batch 2: 2 steps an epoch, 6 steps
    return ["finetune", "--references", tiny["references"], "--out", out,
            "--denoiser-checkpoint", tiny["if2"], "--classifier", "tiny-clip",
            "--classifier-checkpoint", tiny["clip"], "--epochs", "3", "--lr", "1e-3",
            "--batch-size", batch, "--resolution", "32", "--device", "cpu", "--quiet"]


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def loss_rows(out: Path) -> list[list[str]]:
    return [line.split("\t") for line in (out / "loss_log.tsv").read_text().splitlines()]


def summed_lr(out: Path) -> float:
    rows = loss_rows(out)
    return sum(float(value) for value in
               [row[rows[0].index("lr")] for row in rows[1:]])


def assert_same_training(one: Path, two: Path, weights: str, losses: list[str],
                         start: dict[str, torch.Tensor] | None = None) -> None:
    """The two-process run `two` against the one-process run `one`.

    Losses: every step's mean over the global batch, computed by each run from its own
    weights, agrees to 1e-5 relative (seen: 3e-7): the same images, timesteps and noise,
    and weights that stay together. Another batch or other draws differ at the first
    step by percents.

    Weights: the gradients differ by float32 rounding (the all-reduce adds two halves'
    means, one process sums the whole batch in one kernel), and AdamW divides each
    element by its own running RMS, so an element whose exact gradient is 0 moves by up
    to about lr a step in a direction set by rounding noise, in each run independently:
    the key biases of attention (softmax ignores a shift common to a query's logits), seen
    to differ by 0.004 after 6 steps of lr <= 1e-3. Every element is therefore allowed
    2 x (the sum of the learning rates); away from those zero-gradient elements the
    difference is bounded relative to the training's own change (`start`: the weights
    before training; None: LoRA's B, which starts at 0, so the change is B itself).
    """
    rows_one, rows_two = loss_rows(one), loss_rows(two)
    assert rows_one[0] == rows_two[0] and len(rows_one) == len(rows_two) > 1
    header = rows_one[0]
    for row_one, row_two in zip(rows_one[1:], rows_two[1:], strict=True):
        assert row_one[0] == row_two[0]  # step
        for name in losses:
            index = header.index(name)
            assert float(row_two[index]) == pytest.approx(float(row_one[index]), rel=1e-5)
    a, b = load_file(str(one / weights)), load_file(str(two / weights))
    assert set(a) == set(b)
    bound = 2 * summed_lr(one)
    for name in a:
        assert (a[name] - b[name]).abs().max() <= bound, name
    if start is None:
        changed = [n for n in a if "lora_B" in n]
        change = {n: a[n] for n in changed}
    else:
        changed = [n for n in a if "in_proj_bias" not in n and not torch.equal(a[n], start[n])]
        change = {n: a[n] - start[n] for n in changed}
    assert changed
    difference = sum(float((a[n] - b[n]).norm()) ** 2 for n in changed) ** 0.5
    moved = sum(float(change[n].norm()) ** 2 for n in changed) ** 0.5
    # seen: 4e-6 (LoRA), 4e-5 (CLIP)
    assert moved > 0 and difference <= 1e-3 * moved, (difference, moved)


@launched
def test_personalize_in_two_processes_trains_what_one_does(tiny, tmp_path):
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    succeeded(adapt(tiny, personalize_args(tiny, one), 1))
    result = adapt(tiny, personalize_args(tiny, two), 2)
    succeeded(result)
    assert result.stdout.count("LoRA weights:") == 2  # both processes ended the command
    assert_same_training(one, two, "pytorch_lora_weights.safetensors",
                         ["loss", "L_diff", "L_clf"])
    record = json.loads((two / "adapt_config.json").read_text())
    assert record["status"] == "complete" and record["processes"] == 2
    assert record["batch_size"] == 4 and record["batch_size_per_process"] == 2
    assert record["resumed"] == []  # opened once, by one process
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    # The same global batch of 4 as 2 micro-batches of 2, one image per process each
    # (DDP's no_sync for the first), with gradient checkpointing: the same training.
    succeeded(adapt(tiny, [*personalize_args(tiny, accum, batch=2), "--grad-accum", "2",
                           "--gradient-checkpointing"], 2))
    assert_same_training(one, accum, "pytorch_lora_weights.safetensors",
                         ["loss", "L_diff", "L_clf"])
    record = json.loads((accum / "adapt_config.json").read_text())
    assert record["effective_batch_size"] == 4 and record["batch_size_per_process"] == 1


@pytest.fixture(scope="module")
def finetuned(tiny, tmp_path_factory):
    """One- and two-process fine-tuning at the same global batch (shared by two tests)."""
    folder = tmp_path_factory.mktemp("finetuned")
    succeeded(adapt(tiny, finetune_args(tiny, folder / "one"), 1))
    succeeded(adapt(tiny, finetune_args(tiny, folder / "two"), 2))
    return folder / "one", folder / "two"


@launched
def test_finetune_in_two_processes_trains_what_one_does(tiny, finetuned):
    one, two = finetuned
    assert_same_training(one, two, "classifier.safetensors", ["L_clf", "accuracy"],
                         start=load_file(str(tiny["clip"])))


@launched
def test_a_sigterm_to_one_process_checkpoints_and_the_rerun_resumes_in_both(
    tiny, finetuned, tmp_path
):
    out = tmp_path / "clf"
    # rank 1 only, during step 3 of 6 (its third classifier call): both stop after it
    result = adapt(tiny, finetune_args(tiny, out), 2, ADAPT_TEST_SIGTERM="1,3")
    assert result.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3"]
    assert len(loss_rows(out)) == 1 + 3
    assert not (out / "classifier.safetensors").exists()

    succeeded(adapt(tiny, finetune_args(tiny, out), 2))
    record = json.loads((out / "finetune_config.json").read_text())
    assert [r["step"] for r in record["resumed"]] == [3]
    # the same processes, the same sums: the uninterrupted two-process run exactly
    whole = load_file(str(finetuned[1] / "classifier.safetensors"))
    resumed = load_file(str(out / "classifier.safetensors"))
    assert set(whole) == set(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert loss_rows(out)[1:][-1][:4] == loss_rows(finetuned[1])[1:][-1][:4]


@launched
@pytest.mark.parametrize("command", ["personalize", "finetune"])
def test_a_batch_the_processes_cannot_share_is_refused_by_every_process(tiny, tmp_path,
                                                                         command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    before = snapshot(out)
    make = personalize_args if command == "personalize" else finetune_args
    result = adapt(tiny, make(tiny, out, batch=3), 2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, result.stderr[-4000:]  # one line from each process
    for line in errors:
        assert "batch_size (--batch-size" in line and "3 is the global batch" in line
        assert "multiple of 2" in line
    # no process's traceback, only the launcher's report of the failed processes
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr
    assert "AdaptError" not in result.stderr
    # both processes exited 2 (torch.distributed.run reports each failed rank's code)
    assert result.stderr.count("exitcode  : 2") == 2, result.stderr[-4000:]
    assert snapshot(out) == before



# -- the helpers, in this process (no launcher) --------------------------------------------


class Processes:
    """What the helpers read of an Accelerator: the process count and this one's index."""

    def __init__(self, num_processes: int, process_index: int):
        self.num_processes, self.process_index = num_processes, process_index
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_the_shares_of_the_processes_are_the_global_batch_in_order(processes):
    from adapt.training import process_share

    batch = 12
    shares = [list(range(batch))[process_share(batch, Processes(processes, rank))]
              for rank in range(processes)]
    assert [i for share in shares for i in share] == list(range(batch))
    assert {len(share) for share in shares} == {batch // processes}


def test_a_batch_not_a_multiple_of_the_processes_is_refused_after_a_barrier():
    from adapt.errors import AdaptError
    from adapt.training import check_batch_for_processes

    fits = Processes(4, 1)
    check_batch_for_processes("batch_size", 8, fits)
    assert fits.barriers == 0
    odd = Processes(4, 1)
    with pytest.raises(AdaptError, match="batch_size 6 is the global batch, shared by 4 "
                                         "processes: it must be a multiple of 4"):
        check_batch_for_processes("batch_size", 6, odd)
    assert odd.barriers == 1  # every process reports before any exits


@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("1", 1), ("4", 4), ("x", None),
                                                 ("0", None)])
def test_launcher_world_size(monkeypatch, value, expected):
    from adapt.errors import AdaptError
    from adapt.training import launcher_world_size

    if value is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", value)
    if expected is None:
        with pytest.raises(AdaptError, match="WORLD_SIZE"):
            launcher_world_size()
    else:
        assert launcher_world_size() == expected


def test_a_device_index_under_a_launcher_is_refused(monkeypatch):
    from adapt.errors import AdaptError
    from adapt.training import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(AdaptError, match="each process uses its own device"):
        make_accelerator("no", "cuda:1")


def test_batch_norm_is_refused_for_several_cpu_processes():
    import torchvision

    from adapt.errors import AdaptError
    from adapt.training import check_no_batch_norm

    check_no_batch_norm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
    with pytest.raises(AdaptError, match="batch norm layer"):
        check_no_batch_norm(torchvision.models.resnet18(weights=None, num_classes=2))


@launched
def test_a_process_started_with_other_settings_is_refused_by_every_process(tiny, tmp_path):
    out = tmp_path / "out"
    result = adapt(tiny, finetune_args(tiny, out), 2, ADAPT_TEST_RANK1_ARGS="--lr 2e-3")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2, result.stderr[-4000:]
    for line in errors:
        assert "process 1 was started with other settings than process 0 (lr differ)" in line
    assert result.stderr.count("exitcode  : 2") == 2, result.stderr[-4000:]
    assert not out.exists()
