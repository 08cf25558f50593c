"""What every benchmark needs: fast BLAS for MLX on Linux, memory readings, results as JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
# mlx[cpu] on Linux ships the reference BLAS (~4 GFLOP/s); Debian's OpenBLAS (apt install
# libopenblas0-pthread) exports the same symbols at ~170 GFLOP/s here, so benchmarks preload it.
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")


def fast_blas_env(preload: bool = True) -> dict[str, str]:
    """The environment for a child process: OpenBLAS preloaded where it exists (Linux).

    For MLX only: torch brings its own BLAS, and a preloaded one takes over its GEMMs (3x slower
    here, measured on compare_torch's step)."""
    env = dict(os.environ)
    if preload and sys.platform == "linux" and OPENBLAS.exists():
        env["LD_PRELOAD"] = f"{OPENBLAS} {env.get('LD_PRELOAD', '')}".strip()
    return env


def run_child(module: str, args: list[str], timeout: float = 1800, mlx: bool = True) -> dict:
    """Run `python -m module args` in a fresh process (its own peak memory) and parse its last line as JSON.

    `mlx=False` for a torch-only child: no OpenBLAS preload (see fast_blas_env)."""
    out = subprocess.run([sys.executable, "-m", module, *args], env=fast_blas_env(preload=mlx), capture_output=True,
                         text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Linux: restart the process's high-water mark (VmHWM) so the next reading covers what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _status_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine() -> dict:
    versions = {}
    for package in ("numpy", "mlx", "torch", "bitsandbytes", "transformers", "peft", "mlx-lm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions,
            "openblas_preloaded": str(OPENBLAS) in os.environ.get("LD_PRELOAD", "")}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    return path


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))
