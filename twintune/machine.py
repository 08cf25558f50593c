"""The machine a figure was measured on: CPU model and the flags that decide which kernels torch, MLX
and bitsandbytes run. Benchmarks and `twintune compare` record it beside every figure."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

# The CPU flags that decide which kernels torch, MLX and bitsandbytes run (AVX-512 and AMX paths,
# emulated or native bfloat16): a figure means little without them.
KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_bf16", "amx_tile", "amx_int8")


def cpu_info() -> dict:
    """The CPU's model name, which of KERNEL_FLAGS it has, and a one-word kind for tables.

    From /proc/cpuinfo (Linux), else `lscpu`; on neither (macOS) the flags list is empty."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = _lscpu()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "model name(s)") and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    present = [flag for flag in KERNEL_FLAGS if flag in flags]
    return {"cpu_model": model, "cpu_flags": present, "cpu_kind": cpu_kind(present)}


def peak_rss_mb() -> float:
    """The process's peak resident memory in MiB: one measure on every backend and platform.

    Example:
        >>> peak_rss_mb() > 0
        True
    """
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def cpu_kind(flags: list[str]) -> str:
    """One word for the fastest float kernels the flags allow: avx512-bf16, avx512, avx2 or other."""
    if "avx512_bf16" in flags:
        return "avx512-bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


