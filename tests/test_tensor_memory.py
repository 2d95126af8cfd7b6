"""tests/tensor_memory.py, which the engine's memory test and bench/gpu_memory.py rest on."""

from __future__ import annotations

import copy

import torch

from tests.tensor_memory import PeakTensorMemory


def test_counts_live_storages_once_and_frees_them() -> None:
    with PeakTensorMemory() as memory:
        a = torch.empty(1000)  # 4,000 bytes
        view = a.view(10, 100)[2:]  # same storage: nothing more
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes
        assert memory.current == 8000
        del b
        c = torch.ones(10)  # 40 bytes, after b was freed
        a.add_(1.0)  # in place: nothing more
    assert (memory.peak, memory.current, memory.largest) == (8000, 4040, 4000)
    del a, view, c
    assert memory.current == 0


def test_meta_device_counts_what_the_cpu_counts() -> None:
    # The GPU estimate traces real architectures on the meta device: the count must be the
    # one real tensors give.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.GELU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    ).eval()
    on_meta = copy.deepcopy(model).to("meta")
    peaks = {}
    for device, network in (("cpu", model), ("meta", on_meta)):
        for batch in (1, 4):
            with torch.inference_mode(), PeakTensorMemory() as memory:
                network(torch.zeros((batch, 3, 16, 16), device=device))
            peaks[device, batch] = memory.peak
    assert peaks["cpu", 1] == peaks["meta", 1] and peaks["cpu", 4] == peaks["meta", 4]
    # the first conv's output alone is 8 x 16 x 16 float32 per image
    assert peaks["cpu", 4] - peaks["cpu", 1] >= 3 * 8 * 16 * 16 * 4
