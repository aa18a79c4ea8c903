"""A long CPU training run's resident memory kept near what its tensors hold: glibc's heap trimmed after every
forward and backward.

PyTorch's CPU tensors come from `malloc`. A training step allocates and frees gigabytes of activations whose sizes
change with every record's length, and glibc's heap cannot hand the holes this leaves back to the system: it keeps
them resident and grows the heap when a new size fits no hole. Measured on the default full fine-tune of
SmolLM2-135M (277 BFCL records of up to 1,280 tokens, 2 epochs, AVX512-BF16 Xeon: `bench_train.py --arms
slmtune-full`) the run ended at a peak RSS of 8.0 GB for ~3.5 GB of live tensors; an ad-hoc `mallinfo2` timeline
of the same run showed 1.3–2.0 GB free inside the heap at any moment and the heap growing from 3.3 to 4.7 GB in 3
minutes. `malloc_trim(0)` after every forward and backward (`SlmtuneTrainer.training_step`, each bin of a step)
returns the free pages inside the heap (not only at its top) to the system, so each forward starts from what is in
use; the pages the next one touches again cost a page fault each (docs/defaults.md "Training on the CPU").

Only where glibc's `malloc_trim` exists (Linux with glibc; not musl or macOS) and not on CUDA, whose caching
allocator handles GPU memory itself.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def available() -> bool:
    return _libc() is not None


def trim() -> bool:
    """Return the heap's free pages to the system; True when glibc released any."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))
