"""Peak bytes of the tensors a piece of code creates, on any device, the meta device included.

`PeakTensorMemory` is a `TorchDispatchMode`: every aten op run while it is active reports
its outputs, and each output's storage is counted from the first op that returns it until
the last Python tensor on it is gone. Storages that existed before (model weights, the
input image) are not counted unless an op returns them. This measures what an allocator
must hold for the code's own tensors, independently of the allocator's caching, so it is
the same figure on a CPU, a GPU or the meta device (shapes only, no data), which is how
`bench/gpu_memory.py` sizes a real checkpoint's activations without a GPU.

Written by hand: torch's allocator statistics exist only for CUDA, and the CPU profiler's
memory events do not give a peak of live bytes.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """`with PeakTensorMemory() as memory: ...`, then `memory.peak` (bytes) and
    `memory.largest` (bytes of the largest single storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.largest = 0
        self._bytes: dict[int, int] = {}  # storage id -> its bytes
        self._holders: dict[int, int] = {}  # storage id -> live tracked tensors on it
        self._seen: set[int] = set()  # ids of the live tensors tracked (Tensor == is elementwise)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self._seen:
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: one key per storage, meta included
        self._seen.add(id(tensor))
        if key not in self._holders:
            self._holders[key] = 0
            self._bytes[key] = storage.nbytes()
            self.current += self._bytes[key]
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, self._bytes[key])
        self._holders[key] += 1
        weakref.finalize(tensor, self._release, key, id(tensor))

    def _release(self, key: int, tensor_id: int) -> None:
        self._seen.discard(tensor_id)
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.current -= self._bytes.pop(key)
