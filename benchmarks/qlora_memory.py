"""Peak memory of one QLoRA training step on the GPT-Neo 1.3B shape, beside the float32 base.

    python -m benchmarks.qlora_memory [--shape 1.3b] [--backends mlx,torch] [--batch 8] [--tokens 64]

Each configuration runs in its own process so that its peak is its own. Weights are random
(the shape is what matters); LoRA r=16 on every block linear layer, as the QLoRA recipe. The
floor is the bytes the NF4 weights themselves take (packed codes + quantized absmax).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np

from benchmarks.common import peak_rss_mb, reset_peak_rss, rss_mb, run_child, write_result

def child(backend: str, base: str, shape: str, batch_size: int, tokens: int, steps: int) -> dict:
    from benchmarks.shapes import random_model
    from twintune.backends import backend_class
    from twintune.data.batching import Batch
    from twintune.memory import estimate_memory
    from twintune.backends.base import AdamW
    from twintune.methods import BaseModel, LoRA
    from twintune.quant import Quantization

    cls = backend_class(backend)
    if backend == "mlx":
        import mlx.core as mx
    else:  # what the torch backend imports lazily counts as baseline, not as model memory
        import bitsandbytes  # noqa: F401
        import transformers.models.gpt_neo.modeling_gpt_neo  # noqa: F401
    baseline = rss_mb()
    spec, weights, quantized = random_model(shape, Quantization("nf4") if base == "nf4" else None)
    floor = sum(q.nbytes for q in quantized.values())
    float_weights = sum(w.nbytes for w in weights.values())
    engine = cls(spec, weights, quantized=quantized)
    method = LoRA(r=16, alpha=32, target_modules=spec.LINEAR_NAMES)
    plan = method.plan(BaseModel(spec, weights, quantized), seed=0)
    del weights, quantized
    estimate = estimate_memory(spec, method, Quantization("nf4") if base == "nf4" else None, batch_size, tokens,
                               backend).training_peak / 2**20
    engine.apply_method(plan)
    engine.set_optimizer(AdamW((0.9, 0.999), 1e-8, 0.0))

    rng = np.random.default_rng(0)
    ids = rng.integers(0, spec.vocab_size, (batch_size, tokens), dtype=np.int32)
    answer = np.arange(batch_size, dtype=np.int32) * tokens + tokens - 2
    batch = Batch(input_ids=ids, target_positions=answer, targets=ids[:, -1].copy(), answer_positions=answer,
                  labels=np.zeros(batch_size, np.int32), lengths=np.full(batch_size, tokens))

    def step():
        engine.forward_backward(batch, 1.0 / batch_size)
        engine.optimizer_step(1e-4, 1.0)

    step()  # warm-up: optimizer state and caches exist from here on
    gc.collect()
    resident = rss_mb()
    reset_peak_rss()
    if backend == "mlx":
        mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "backend": backend, "base": base, "shape": shape, "batch": f"{batch_size}x{tokens}",
        "baseline_rss_mb": round(baseline, 1),
        "nf4_floor_mb": round(floor / 2**20, 1),
        "float_weights_mb": round(float_weights / 2**20, 1),
        "resident_before_step_mb": round(resident, 1),
        "peak_rss_step_mb": round(peak_rss_mb(), 1),
        "step_extra_mb": round(peak_rss_mb() - resident, 1),
        "mlx_peak_mb": round(mx.get_peak_memory() / 2**20, 1) if backend == "mlx" else None,
        "step_seconds_median": round(float(np.median(times)), 2),
        "estimate_mb": round(estimate, 1),  # twintune estimate's training peak (framework memory not included)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.3b")
    parser.add_argument("--backends", default="mlx,torch")
    parser.add_argument("--bases", default="nf4,fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "BASE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.shape, args.batch, args.tokens, args.steps)))
        return

    rows = []
    for backend in args.backends.split(","):
        for base in args.bases.split(","):
            row = run_child("benchmarks.qlora_memory", ["--child", backend, base, "--shape", args.shape,
                                                        "--batch", str(args.batch), "--tokens", str(args.tokens),
                                                        "--steps", str(args.steps)], mlx=backend == "mlx")
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ("backend", "base", "nf4_floor_mb", "float_weights_mb", "resident_before_step_mb", "peak_rss_step_mb",
              "step_extra_mb", "mlx_peak_mb", "step_seconds_median", "estimate_mb")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    name = f"qlora_memory_{args.shape}" + ("" if args.bases == "nf4,fp32" and args.backends == "mlx,torch"
                                           else f"_{args.backends.replace(',', '-')}_{args.bases.replace(',', '-')}")
    path = write_result(name, {"rows": rows})
    print(json.dumps({"result": str(path)}))


if __name__ == "__main__":
    main()
