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

from twintune.machine import cpu_info

RESULTS = Path(__file__).parent / "results"
# mlx[cpu] on Linux ships the reference BLAS (~4 GFLOP/s); Debian's OpenBLAS (apt install
# libopenblas0-pthread) exports the same symbols at ~170 GFLOP/s here, so benchmarks preload it.
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
OPENBLAS_MISSING = ("WARNING: Debian's OpenBLAS is not installed (apt-get install libopenblas0-pthread): "
                    "MLX runs on its slow reference BLAS; figures are not comparable")


def fast_blas_env(preload: bool = True) -> dict[str, str]:
    """The environment for a child process: OpenBLAS preloaded where it exists (Linux).

    For MLX only: torch brings its own BLAS, and a preloaded one takes over its GEMMs (3x slower
    here, measured on compare_torch's step)."""
    env = dict(os.environ)
    if preload and sys.platform == "linux":
        if OPENBLAS.exists():
            env["LD_PRELOAD"] = f"{OPENBLAS} {env.get('LD_PRELOAD', '')}".strip()
        else:  # every MLX child says it: a 40x slower GEMM must not pass unnoticed into a table
            print(OPENBLAS_MISSING, file=sys.stderr, flush=True)
    return env


def run_child(module: str, args: list[str], timeout: float = 1800, mlx: bool = True,
              env: dict[str, str] | None = None) -> dict:
    """Run `python -m module args` in a fresh process (its own peak memory) and parse its last line as JSON.

    `mlx=False` for a torch-only child: no OpenBLAS preload (see fast_blas_env). `env` adds variables
    a library reads once at load (OPENBLAS_NUM_THREADS, say)."""
    announce_machine()
    out = subprocess.run([sys.executable, "-m", module, *args], env={**fast_blas_env(preload=mlx), **(env or {})},
                         capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)
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


def machine_line() -> str:
    """One line naming the CPU and its kernel flags, printed before a benchmark's figures."""
    cpu = cpu_info()
    blas = "installed" if OPENBLAS.exists() else "MISSING"
    return (f"machine: {cpu['cpu_model']}, {os.cpu_count()} cores, cpu_kind {cpu['cpu_kind']} "
            f"(flags: {' '.join(cpu['cpu_flags']) or 'none'}), OpenBLAS for MLX {blas}")


_announced = False


def announce_machine() -> None:
    """Print machine_line() once per process (run_child and write_result call it)."""
    global _announced
    if not _announced:
        _announced = True
        print(machine_line(), flush=True)


def machine() -> dict:
    versions = {}
    for package in ("numpy", "mlx", "torch", "bitsandbytes", "transformers", "peft", "mlx-lm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "versions": versions,
            "openblas_preloaded": str(OPENBLAS) in os.environ.get("LD_PRELOAD", ""),
            "openblas_installed": OPENBLAS.exists(), **cpu_info()}


def write_result(name: str, payload: dict) -> Path:
    announce_machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    return path


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))


def gemm_peak_gflops(framework: str, n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """This process's GEMM rate in `dtype`: the fastest of `repeats` n x n x n products, the MFU
    denominator. The fastest, not the median: a peak is the best the machine did, and on this
    shared 2-core machine the median of a few products ran anywhere from 82 to 158 GFLOP/s."""
    if framework == "mlx":
        import mlx.core as mx

        a, b = (mx.random.normal((n, n)).astype(getattr(mx, dtype)) for _ in range(2))
        mx.eval(a, b)
        _, times = median_time(lambda: mx.eval(a @ b), repeats)
    else:
        import torch

        a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
        _, times = median_time(lambda: a @ b, repeats)
    return 2 * n**3 / min(times) / 1e9


def lora_training_flops(linear_layers: dict[str, tuple[int, int]], adapted: list[str], r: int, hidden: int,
                        num_layers: int, vocab: int, lengths: list[int], n_targets: int) -> float:
    """The FLOPs an epoch of LoRA training needs on a frozen base (2 per multiply-add), whoever runs it.

    Per real token: the block linears forward (2N) and their input gradients (2N; frozen weights get
    none); attention 4 * length * hidden per block forward, twice that backward; each adapter's two
    products forward, input and weight gradients (6 r (in + out)). Per label position: the output
    layer's row forward and its input gradient (4 hidden vocab). Padding and full-vocabulary logits
    are not useful work, so every contender is credited the same figure.
    """
    n_linear = sum(o * i for o, i in linear_layers.values())
    adapter = sum(6 * r * (linear_layers[name][0] + linear_layers[name][1]) for name in adapted)
    tokens = sum(lengths)
    attention = sum(12 * length * length * hidden * num_layers for length in lengths)
    return 4 * n_linear * tokens + adapter * tokens + attention + 4 * hidden * vocab * n_targets


def method_training_flops(plan, linear_layers: dict[str, tuple[int, int]], hidden: int, num_layers: int, vocab: int,
                          lengths: list[int], n_targets: int, output_weight: str = "transformer.wte.weight") -> float:
    """The FLOPs an epoch of training with `plan` (a twintune Plan) needs, whoever runs it (2 per multiply-add).

    Per real token: every block linear forward (2N); backward, the input gradients (2 o i) of the
    linears in the blocks the gradient passes through (from the lowest block holding a trained
    value up; every block when an embedding trains) and the weight gradients (2 o i) of the
    linears whose own weight trains; attention 4 * length * hidden per block forward, twice that
    backward in the blocks the gradient passes through; each LoRA/DoRA adapter's two products
    forward, input and weight gradients (6 r (in + out)). Per label position: the output layer's
    row forward and its input gradient (4 hidden vocab), and its weight gradient (2 hidden vocab)
    when `output_weight` trains. Element-wise work (IA3's and DoRA's vectors, biases, norms) and
    DoRA's per-step weight norms are not counted. For LoRA on every block this is
    lora_training_flops' figure.
    """
    from twintune.methods.base import block_index

    trained = set(plan.initial_values())
    blocks = [block_index(name) for name in trained]
    lowest = 0 if any(b is None and not _above_blocks(n) for b, n in zip(blocks, trained)) else \
        min((b for b in blocks if b is not None), default=num_layers)
    through = lambda layer: (block_index(layer) if block_index(layer) is not None else 0) >= lowest
    tokens = sum(lengths)
    per_token = sum(2 * o * i for o, i in linear_layers.values())
    per_token += sum(2 * o * i for layer, (o, i) in linear_layers.items() if through(layer))
    per_token += sum(2 * o * i for layer, (o, i) in linear_layers.items() if f"{layer}.weight" in trained)
    for layer, surgery in plan.wrapped().items():
        if f"{layer}.lora_A.weight" in surgery.values:  # LoRA and DoRA: the rank is A's rows
            o, i = linear_layers[layer]
            per_token += 6 * surgery.values[f"{layer}.lora_A.weight"].shape[0] * (o + i)
    passed = num_layers - min(lowest, num_layers)
    attention = sum(length * length * hidden * (4 * num_layers + 8 * passed) for length in lengths)
    output = (6 if output_weight in trained else 4) * hidden * vocab * n_targets
    return per_token * tokens + attention + output


def _above_blocks(name: str) -> bool:
    """The final norm and an untied output layer sit above every block: training them sends no
    gradient into the blocks (a tied one is also the token embedding, below them)."""
    return name.startswith(("transformer.ln_f.", "model.norm.", "lm_head."))


def check_targets(ratios: dict[str, float], targets: dict[str, tuple[str, float]]) -> dict[str, dict]:
    """Each target (ratio key -> ('>=' or '<=', bound)) with its ratio and PASS/FAIL, printed one per line."""
    verdicts = {}
    for key, (op, bound) in targets.items():
        value = ratios[key]
        ok = value >= bound if op == ">=" else value <= bound
        verdicts[key] = {"ratio": value, "target": f"{op} {bound}", "pass": ok}
        print(f"{'PASS' if ok else 'FAIL'}  {key} = {value:.3f} (target {op} {bound})")
    return verdicts


def print_epoch_table(rows: dict[str, dict], memory_key: str, memory_header: str) -> None:
    """One line per contender: epoch time (and the warm-up epoch's), real tokens/s, peak memory,
    achieved GFLOP/s, GEMM peak, MFU."""
    print(f"{'':18s} {'epoch s':>9s} {'warm-up s':>10s} {'real tok/s':>11s} {memory_header:>12s} {'GFLOP/s':>8s} "
          f"{'GEMM peak':>10s} {'MFU':>6s}")
    for kind, row in rows.items():
        print(f"{kind:18s} {row['epoch_seconds']:9.2f} {row['warmup_epoch_seconds']:10.2f} "
              f"{row['real_tokens_per_s']:11.1f} {row[memory_key]:12.1f} "
              f"{row['achieved_gflops']:8.1f} {row['gemm_peak_gflops']:10.1f} {row['mfu']:6.3f}")


INSTRUCTION_TEMPLATE = "Instruction: Finish the sentence.\nInput: {start}\nOutput:"


def instruction_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs for the instruction-task benchmarks: each synthetic sentence cut in
    two, its first half in the instruction, its second half the completion — completions of 8-20
    tokens, so every completion position needs the whole vocabulary (unlike a label word)."""
    from twintune.data.synthetic import synthetic_financial_sentiment

    pairs = []
    for example in synthetic_financial_sentiment(n=n, seed=seed):
        words = example.text.split()
        cut = len(words) // 2
        pairs.append((INSTRUCTION_TEMPLATE.format(start=" ".join(words[:cut])), " " + " ".join(words[cut:])))
    return pairs


PACKED_LENGTH = 256  # tokens in a packed instruction row (the comparisons' --packed)


def instruction_task(source: Path, packed: bool) -> list[str]:
    """Recipe overrides for the instruction task on `source`; `packed`: rows of PACKED_LENGTH tokens."""
    return [f"task={{name: instruction, packing: {str(packed).lower()}}}", f"data.source={source}",
            *([f"data.max_length={PACKED_LENGTH}"] if packed else [])]


def target_tokens(encoded) -> int:
    """How many tokens of these encoded rows the loss reads: past the prompt, or the packed rows' targets."""
    return sum(len(e.ids) - e.prompt_len if e.target_mask is None else int(e.target_mask.sum()) for e in encoded)


def write_instruction_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """instruction_pairs as prompt/completion JSONL (the format twintune's instruction task and mlx-lm read)."""
    import json

    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in instruction_pairs(n, seed)))
    return path
