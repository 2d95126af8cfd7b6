"""bench/gpu_throughput.py, the one-command GPU benchmark of issue 11, tested on the CPU.

The GPU run itself needs a device lease; here the script runs its tiny mode (the test
suite's tiny IF-II + tiny CLIP) and its pieces, and these tests check what it reports
against what it must equal: the rows the `certify` command writes, the arithmetic of
images per hour and fractions of peak, the FLOP count of the real architecture against
docs/benchmarks.md, and a JSON that survives a stage that never ends.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from bench import gpu_throughput
from bench.gpu_throughput import (
    COHEN_POPULATION_DRAW_FRACTION,
    TABLE_IMAGES,
    TINY,
    TINY_CLASSES,
    RandomImages,
    main,
    peak_for_name,
)
from tests.cli_helpers import invoke, rows, sidecar
from tests.tiny_models import one_thread

pytest.importorskip("diffusers")
pytest.importorskip("open_clip")

GRID = "0,0.25,0.5,0.75,1.0"
HOURS = f"gpu_hours_for_{TABLE_IMAGES}_images"


single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_flops_of_if2_l_with_clip_b32_at_224_match_the_documented_estimate():
    from bench.gpu_memory import if2_l_clip_b32

    model, _ = if2_l_clip_b32(torch.bfloat16, "meta")
    flops = gpu_throughput.count_flops(model, 224, "meta")
    # docs/benchmarks.md: "one noisy sample costs about 2.36 TFLOP"
    assert flops == pytest.approx(2.36e12, rel=0.01)
    denoiser_only = gpu_throughput.count_flops(_Denoise(model), 224, "meta")
    assert 0 < flops - denoiser_only < 0.01 * flops  # "CLIP-B/32 adds under 1%"


class _Denoise(torch.nn.Module):
    def __init__(self, pipeline: torch.nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.pipeline.denoiser(noisy, self.pipeline.sigma)


@pytest.mark.slow
def test_projection_constant_is_the_draw_fraction_bench_sequential_measures():
    from bench.sequential import cohen_population

    record = cohen_population()
    if record is None:
        pytest.skip("../shared/reference/cohen2019 is not there")
    assert round(record["samples_ratio"], 3) == COHEN_POPULATION_DRAW_FRACTION


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA H100 PCIe", None), ("NVIDIA H200 NVL", None),
    ("Tesla T4", None),
])
def test_peak_table_knows_sxm_parts_only(name, peak):
    assert peak_for_name(name) == peak


# -- the stages' bookkeeping, with stand-in stages -----------------------------------------


def _read(out):
    return json.loads((out / "gpu_throughput.json").read_text())


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_json_after_each_stage_and_a_budget_that_ends_after_stage_b(tmp_path, monkeypatch):
    clock, seen = FakeClock(), {}

    def environment(context, record):
        record["value"] = 1

    def throughput(context, record):
        seen["during b"] = _read(tmp_path)
        record["value"] = 2
        clock.now = 10**6  # the budget is spent when stage b ends

    def never(context, record):
        raise AssertionError("a stage past the budget ran")

    monkeypatch.setattr(gpu_throughput, "STAGES", {
        "environment": environment, "throughput": throughput, "certify": never, "packing": never,
    })
    main(["--tiny", "--out", str(tmp_path), "--budget-s", "100"], clock=clock)
    during = seen["during b"]["stages"]
    assert during["environment"] == {"value": 1, "status": "done",
                                     "seconds": during["environment"]["seconds"]}
    assert during["throughput"]["status"] == "running"
    stages = _read(tmp_path)["stages"]
    assert (stages["environment"]["value"], stages["throughput"]["value"]) == (1, 2)
    assert stages["throughput"]["status"] == "done"
    assert stages["certify"]["status"] == stages["packing"]["status"] == "skipped: out of budget"


def test_a_run_killed_inside_a_stage_leaves_the_earlier_numbers(tmp_path, monkeypatch):
    def done(context, record):
        record["value"] = 3

    def killed(context, record):
        record["half"] = True
        raise KeyboardInterrupt  # as the device's timeout would stop it

    monkeypatch.setattr(gpu_throughput, "STAGES", {"environment": done, "throughput": done,
                                                   "certify": killed, "packing": done})
    with pytest.raises(KeyboardInterrupt):
        main(["--tiny", "--out", str(tmp_path)])
    stages = _read(tmp_path)["stages"]
    assert stages["environment"]["value"] == stages["throughput"]["value"] == 3
    assert stages["certify"]["status"] == "running"
    assert "packing" not in stages


def test_a_failing_stage_is_reported_and_the_next_ones_still_run(tmp_path, monkeypatch):
    def fails(context, record):
        raise ValueError("no such kernel")

    def done(context, record):
        record["value"] = 4

    monkeypatch.setattr(gpu_throughput, "STAGES", {"environment": done, "throughput": fails,
                                                   "certify": done, "packing": done})
    main(["--tiny", "--out", str(tmp_path)])
    stages = _read(tmp_path)["stages"]
    assert stages["throughput"]["status"] == "failed: ValueError: no such kernel"
    assert stages["certify"]["status"] == stages["packing"]["status"] == "done"


# -- the real stages in tiny mode ------------------------------------------------------------


def test_environment_stage_on_the_cpu(tmp_path):
    data = main(["--tiny", "--out", str(tmp_path), "--stages", "environment"])
    stage = data["stages"]["environment"]
    assert stage["status"] == "done"
    noise = stage["noise"]
    assert noise["same_draw_for_a_seed"] and noise["float32"]
    assert noise["mean_ok"] and noise["std_ok"]
    identity = stage["packing_identity"]
    assert identity["examples"] == TINY.digits_examples
    assert identity["votes_compared"] == 100 * TINY.digits_examples
    # docs/scale.md: on the digits CNN the packed rows equal the unpacked ones
    assert identity["rows_differing"] == [] and identity["identical_rows"]
    assert data["stages"]["certify"]["status"] == "not asked for (--stages)"


def test_packing_compare_packs_ten_examples_per_pass():
    from bench.packing import compare
    from classifiers import build_classifier, build_dataset

    digits = build_dataset("digits", split="test")
    cnn = build_classifier("digits-sigma0.25", class_names=digits.classes, sigma=0.25)
    sizes: list[int] = []
    cnn.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    row = compare("digits CNN", cnn, [digits[i][0] for i in range(20)], 10, repeats=1)
    assert row["examples"] == 20
    # each work runs twice (warm-up, timed): Cohen's loop passes 100 copies per example,
    # the packed runner 1000 (two groups of ten) then the clean batch of each group's ten;
    # no other work passes a batch of 10 after one of 1000
    packed = [1000, 10, 1000, 10]
    runs = [i for i in range(len(sizes) - 3) if sizes[i:i + 4] == packed]
    assert len(runs) == 2
    assert sizes[:20] == [100] * 20  # the reference's warm-up comes first


@contextmanager
def registered_tiny_models(files):
    """The bench's tiny CLIP and random images as a model and a dataset `certify` knows."""
    from classifiers.registry import CLASSIFIERS, DATASETS, Entry

    def model(*, class_names, sigma=None, weights=None, device="cpu"):
        return gpu_throughput.tiny_clip(files, class_names, device)

    def dataset(*, split="test", data_root=None):
        return RandomImages(max(TINY.full_images, TINY.sequential_images), TINY.size,
                            TINY_CLASSES)

    CLASSIFIERS._entries["bench-tiny-clip"] = Entry("bench-tiny-clip", model, "test model")
    DATASETS._entries["bench-random"] = Entry("bench-random", dataset, "test images")
    try:
        yield
    finally:
        del CLASSIFIERS._entries["bench-tiny-clip"], DATASETS._entries["bench-random"]


@pytest.mark.parametrize("dtype", ["bf16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_tiny_run_measures_the_certify_command(tmp_path, dtype):
    from cli.main import certify_command

    peak = 0.5
    data = main(["--tiny", "--out", str(tmp_path / "bench"), "--peak-tflops", str(peak),
                 "--stages", "throughput,certify", "--dtype", dtype])
    stages = data["stages"]
    assert stages["throughput"]["status"] == stages["certify"]["status"] == "done"
    assert stages["throughput"]["micro_batches"]  # measured, not skipped
    measured = stages["certify"]["measured"]
    assert len(measured["full_n"]) == TINY.full_images
    assert len(measured["sequential"]) == TINY.sequential_images

    # the same tiny models, seed and settings through the certify command
    files = gpu_throughput.save_tiny_models(tmp_path / "models")
    common = ["--model", "bench-tiny-clip", "--dataset", "bench-random", "--denoiser", "if2",
              "--denoiser-checkpoint", str(files["if2"]), "--sigma", "0.5",
              "--n0", str(TINY.n0), "--n", str(TINY.n), "--batch", str(TINY.batch),
              "--seed", "0", "--dtype", dtype, "--device", "cpu", "--quiet"]
    runs = {"full_n": [], "sequential": ["--sequential", "--radii", GRID]}
    with registered_tiny_models(files):
        for kind, extra in runs.items():
            stem = tmp_path / "cli" / kind
            count = len(measured[kind])
            result = invoke(certify_command, *common, *extra, "--max", count, "--out", stem)
            assert result.exit_code == 0, result.output
            table = rows(stem, without_time=True)
            passes = [sidecar(stem)["forward_passes_by_row"][r["idx"]] for r in table]
            bench_rows = [{k: v for k, v in image["row"].items() if k != "time"}
                          for image in measured[kind]]
            assert bench_rows == table, kind
            assert [image["draws"] for image in measured[kind]] == passes
    assert {r["predict"] for r in table} <= {str(i) for i in range(len(TINY_CLASSES))} | {"-1"}

    # images per hour, GPU-hours and fractions of peak from the measured seconds
    summary = stages["certify"]["summary"]
    full = summary["full_n_measured"]
    seconds = [image["seconds"] for image in measured["full_n"]]
    assert full["seconds_per_image"] == pytest.approx(sum(seconds) / len(seconds))
    assert full["images_per_hour"] == pytest.approx(3600 / full["seconds_per_image"])
    assert full[HOURS] == pytest.approx(TABLE_IMAGES / full["images_per_hour"])
    flops = stages["throughput"]["flops_per_sample"]
    draws = sum(image["draws"] for image in measured["full_n"])
    assert draws == TINY.full_images * (TINY.n0 + TINY.n)
    assert full["tflops"] == pytest.approx(draws * flops / sum(seconds) / 1e12)
    assert full["fraction_of_peak"] == pytest.approx(full["tflops"] / peak)
    projected = summary["sequential_projected"]
    assert projected["images_per_hour"] == pytest.approx(
        full["images_per_hour"] / COHEN_POPULATION_DRAW_FRACTION)
    assert "projection" in projected["basis"]
    sequential = summary["sequential_measured_random_weights"]
    assert sequential["images_per_hour"] == pytest.approx(
        3600 * len(measured["sequential"]) / sum(i["seconds"] for i in measured["sequential"]))
    for row in stages["throughput"]["micro_batches"]:
        assert row["samples_per_s"] == pytest.approx(row["calls"] * row["micro_batch"]
                                                     / row["seconds"])
        assert row["tflops"] == pytest.approx(row["samples_per_s"] * flops / 1e12)
        assert row["fraction_of_peak"] == pytest.approx(row["tflops"] / peak)
    assert [r["micro_batch"] for r in stages["throughput"]["micro_batches"]] == list(
        TINY.micro_batches)


@pytest.mark.slow
def test_whole_tiny_run_through_the_module_entry_point(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_throughput", "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = _read(out)
    assert [data["stages"][name]["status"] for name in gpu_throughput.STAGES] == ["done"] * 4
    assert data["peak_tflops"] is None  # a CPU, no --peak-tflops: no fraction is made up
    assert data["stages"]["certify"]["summary"]["full_n_measured"].get("fraction_of_peak") \
        is None
    assert "PROJECTED" in result.stdout and "measured" in result.stdout
