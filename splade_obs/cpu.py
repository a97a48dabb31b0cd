"""What this CPU is fast at, measured rather than assumed.

torch's ``get_cpu_capability()`` names the ATen vector ISA (e.g. ``AVX512``) but not whether oneDNN's bf16
matrix kernels (AMX, AVX512-BF16) are usable, and emulated bf16 is slower than fp32. So the answer comes
from a ~20 ms timing of the SPLADE head's own shape, once per process. Where emulation is certain (an x86
CPU whose Linux flags list neither ``avx512_bf16`` nor ``amx_bf16``) the probe is skipped: emulated, it
takes seconds (3 s on an AVX2 AMD EPYC), paid by every command.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

#: Where Linux lists the CPU's flags (a module constant so that tests can point it at a written file).
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def x86_bf16_is_emulated() -> bool:
    """True on an x86 CPU whose flags (Linux ``/proc/cpuinfo``) show no native bf16 matrix instructions.

    False where that cannot be told (another architecture or OS, unreadable file): the probe decides then.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return not NATIVE_BF16_FLAGS & set(line.partition(":")[2].split())
    return False


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time of a ``(256 x 128) @ (128 x 4096)`` matmul on this CPU (> 1: bf16 is faster).

    0.0 without timing anything where the CPU flags show that bf16 would be emulated.
    """
    forced = os.environ.get("SPLADE_OBS_CPU_BF16")
    if forced is not None:  # "1"/"0": skip the probe (reproducible CI, or a known machine)
        return 2.0 if forced == "1" else 0.5
    if x86_bf16_is_emulated():
        return 0.0
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 128, generator=gen)
    b = torch.randn(128, 4096, generator=gen)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)  # warm-up: first calls pick and JIT the kernels
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            torch.mm(x, y)
            best = min(best, time.perf_counter() - t)
        timings[dtype] = best
    return timings[torch.float32] / max(timings[torch.bfloat16], 1e-9)


def cpu_bf16_is_fast(threshold: float = 1.25) -> bool:
    """True when bf16 matmuls beat fp32 clearly on this CPU (native bf16 kernels, not emulation)."""
    return bf16_matmul_speedup() >= threshold


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_heap() -> bool:
    """Give the memory the C heap holds free back to the operating system (glibc's ``malloc_trim(0)``).

    Encoding allocates a few ``batch x vocabulary`` float tensors per batch (15.6 MB each at batch 128 with
    BERT's 30,522 terms); glibc serves those from its heap once a freed one has raised its mmap threshold, and
    the heap keeps the freed space fragmented, so the resident memory climbs by about one such tensor a batch
    without anything being live (measured: 8,192 documents at batch 128 in one call, anonymous RSS 300 ->
    1,300 MB). :meth:`splade_obs.model.SpladeEncoder.encode` calls this after every batch on CPU: the peak stays
    at ~410 MB, the cost (~7 ms a call) is inside the run-to-run noise of a 200 ms batch, and a fixed mmap
    threshold (``mallopt``), the other cure, made encoding 12-20% slower with its page faults. A no-op
    returning False where glibc is not the C library.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
