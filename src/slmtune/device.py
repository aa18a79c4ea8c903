"""What this machine computes on: CUDA or the CPU, whether bf16 is fast here, how many processes share a run.

One place for the checks that training, eval, serving and the benchmarks all make, so they agree.
"""

from __future__ import annotations

import os
from pathlib import Path


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def world_size() -> int:
    """Processes in this run (accelerate / torchrun set WORLD_SIZE); 1 for a plain `slmtune train`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def bf16_fast() -> bool:
    return bf16_verdict()[0]


def bf16_verdict() -> tuple[bool, str]:
    """(is bf16 the fast precision here, why) — what `auto` precision and dtype decide on."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {'supports' if ok else 'lacks'} bf16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False, "CPU flags unreadable (no /proc/cpuinfo): fp32 is the safe choice"
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found:
        return True, f"CPU has {'/'.join(found)}: bf16 matmuls run in hardware"
    return False, "CPU lacks AVX512-BF16/AMX: bf16 matmuls are emulated, far slower than fp32"
