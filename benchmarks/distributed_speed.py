"""Seconds per step on 1 and on 2 processes (torchrun with gloo; mlx.launch with the ring), 127.0.0.1.

    python -m benchmarks.distributed_speed [--backends torch,mlx] [--method lora|full] [--shape 125m]
                                           [--steps 12] [--no-save]

The demo recipe on the random-weight GPT-Neo of the shape (compare_torch's), global batch 8,
`train.steps` steps, through `twintune train` and `twintune train --nproc 2`; --method lora: LoRA r 8
on q_proj and v_proj; --method full: full fine-tuning, with a third torch row, 2 processes with
`train.fsdp: true` (FSDP2: each process holds half of the weights, gradients and AdamW moments).
A row of 1 process on 1 BLAS thread (the same steps, the products' sums split otherwise) shows how
far float32 drifts with itself: each row's losses are compared with the backend's first row
(relative, at step 1 and the most over the steps).
Per row: seconds per step (the run's train_seconds / steps, its first steps' warm-up included),
rank 0's peak memory (the summary's peak_memory_mb: its peak RSS on the CPU), and for 2 processes
the communication per step: the median over steps of `sync_seconds` in metrics.jsonl (the loss
all_sum and the gradients' all-reduce, waiting for the slower process included; with FSDP the
gathers and reduce-scatters run inside the forward and backward, so only the loss's all_sum is
there). On this 2-core CPU two processes share the cores one process's BLAS threads used
(OMP_NUM_THREADS: 2 for one process, 1 each for two): the scaling is reported, not asserted.
Writes results/distributed_speed_<shape>[_full].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import announce_machine, fast_blas_env, write_result


METHODS = {"lora": "method={name: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
           "full": 'method={"name": "full"}'}


def run(backend: str, shape: str, steps: int, nproc: int, method: str = "lora", fsdp: bool = False,
        threads: int | None = None) -> dict:
    from benchmarks.compare_torch import model_dir

    out = Path(tempfile.mkdtemp(prefix=f"dist-{backend}-{nproc}-")) / "run"
    env = {**fast_blas_env(preload=backend == "mlx"), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 1) // nproc))}
    argv = [sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml", "--backend", backend,
            "--out", str(out), "--no-progress", "--set", f"model={model_dir(shape)}", "--set", "data.synthetic_size=400",
            "--set", "train.batch_size=8", "--set", f"train.max_steps={steps}", "--set", "train.warmup_steps=0",
            "--set", METHODS[method], *(["--set", "train.fsdp=true"] if fsdp else []),
            *(["--nproc", str(nproc)] if nproc > 1 else [])]
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{backend} on {nproc} processes failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    syncs = [line["sync_seconds"] for line in lines if line.get("sync_seconds") is not None]
    assert summary["fsdp"] == fsdp, summary["fsdp"]
    return {"backend": backend, "processes": nproc, "fsdp": fsdp, "threads": int(env["OMP_NUM_THREADS"]),
            "steps": summary["steps"], "losses": [line["loss"] for line in lines],
            "peak_memory_mb": summary["peak_memory_mb"],
            "seconds_per_step": summary["train_seconds"] / summary["steps"],
            "sync_seconds_per_step": statistics.median(syncs) if syncs else None,
            "tokens_per_second": summary["real_tokens_per_second"], "final_loss": summary["final_train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--method", default="lora", choices=sorted(METHODS))
    parser.add_argument("--shape", default="125m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    announce_machine()
    # (processes, fsdp, threads per process); 1 process on 1 thread is the same step with the BLAS's
    # sums split otherwise: how far float32 drifts with itself, beside the 2-process rows
    layouts = [(1, False, None), (1, False, 1), (2, False, None)]
    rows = [run(backend, args.shape, args.steps, nproc, args.method, fsdp, threads) for backend in args.backends.split(",")
            for nproc, fsdp, threads in layouts + ([(2, True, None)] if args.method == "full" and backend == "torch" else [])]
    for row in rows:  # each loss against the backend's first row (1 process, all threads), relative
        first = next(r for r in rows if r["backend"] == row["backend"])
        row["loss_drift"] = [abs(a - b) / abs(b) for a, b in zip(row["losses"], first["losses"])]
    what = {"lora": "LoRA r 8 on q_proj and v_proj", "full": "full fine-tuning"}[args.method]
    print(f"GPT-Neo {args.shape}, {what}, global batch 8, {args.steps} steps")
    print(f"{'backend':8s} {'processes':>9s} {'fsdp':>5s} {'threads':>7s} {'s/step':>8s} {'sync s/step':>12s} {'tokens/s':>9s} "
          f"{'peak MB':>8s} {'final loss':>11s} {'drift @1':>10s} {'max drift':>10s}")
    for row in rows:
        sync = f"{row['sync_seconds_per_step']:.4f}" if row["sync_seconds_per_step"] is not None else "–"
        print(f"{row['backend']:8s} {row['processes']:9d} {'yes' if row['fsdp'] else 'no':>5s} {row['threads']:7d} "
              f"{row['seconds_per_step']:8.3f} {sync:>12s} {row['tokens_per_second']:9.0f} "
              f"{row['peak_memory_mb']:8.0f} {row['final_loss']:11.6f} {row['loss_drift'][0]:10.1e} "
              f"{max(row['loss_drift']):10.1e}")
    if not args.no_save:
        name = f"distributed_speed_{args.shape}" + ("" if args.method == "lora" else f"_{args.method}")
        print(f"wrote {write_result(name, {'rows': rows, 'steps': args.steps, 'method': args.method})}")


if __name__ == "__main__":
    main()
