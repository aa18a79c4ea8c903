"""Peak bytes held by torch tensors on the CPU: the number `torch.cuda.max_memory_allocated` gives on a GPU.

Process memory (RSS, private pages) is a poor way to compare LoRA with QLoRA on a CPU: full-precision weights
loaded from safetensors stay memory-mapped file pages (not private memory, and only partly resident), while
4-bit weights are freshly allocated; the Python runtime and the allocator's cache add a few hundred MB to both.
`TensorPeak` counts what a GPU allocator would: every live tensor storage — weights, quantization state,
adapters, gradients, optimizer state, activations and temporaries.

How: tensors that exist on entry are counted from the model (`track(model)`); after that a `TorchDispatchMode`
sees every tensor an op returns and counts each new storage once, until a weakref finalizer sees it freed.
Not seen: scratch memory inside a single kernel (e.g. bitsandbytes dequantizing one layer's weight inside its
op: ~3.5 MB for SmolLM2's largest). The cost is one Python call per op: within run-to-run noise on
SmolLM2-135M here (4 steps of 438 tokens: 134–141 tokens/s tracked, 134–162 untracked).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorPeak(TorchDispatchMode):
    """`with TensorPeak() as mem: mem.track(model); ...` then `mem.peak_mb` (`mem.live`: bytes held now)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()  # ids of live storages (a finalizer removes each one)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def track(self, module: torch.nn.Module) -> None:
        """Count tensors that already exist: the module's parameters, buffers and bitsandbytes quantization state."""
        for t in (*module.parameters(), *module.buffers()):
            self._add(t)
            state = getattr(t, "quant_state", None)
            if state is not None:
                for v in vars(state).values():
                    if isinstance(v, torch.Tensor):
                        self._add(v)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or functional wrappers: no plain storage
            return
        key, size = id(storage), storage.nbytes()
        if size == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out
