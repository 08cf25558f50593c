"""`twintune estimate` against the measured peak of training, on several methods x quantizations x backends.

    python -m benchmarks.memory_estimate [--shape 125m] [--batch 16] [--tokens 64] [--steps 3]
                                         [--configs NAME,...] [--methods lora,dora,...] [--no-save]

It doubles as the table of methods x quantizations x backends: trainable parameters, tokens/s
(median step after the first; every token real) and peak memory for each.

Each configuration runs in its own process through the real recipe path (`prepare`) on a
random-weight GPT-Neo of the shape, then trains `--steps` steps on batches of batch x tokens
real tokens. Measured: `mx.get_peak_memory()` on MLX; on torch (CPU) the process's peak RSS
minus its RSS before the model was loaded (the framework's own memory, which the estimate
leaves out). Both are reset after loading, so they are the training peak the estimate predicts.
Each row says whether the estimate is within 20% of the measured peak. --methods picks the
configurations of some methods (a configuration's method is its recipe's `method.name`, lora
unless it sets another); --configs names them one by one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.common import peak_rss_mb, reset_peak_rss, rss_mb, run_child, write_result

ALL = "[q_proj,k_proj,v_proj,out_proj,c_fc,c_proj]"
# the other methods, with compare_torch's settings (a whole `method` mapping replaces the recipe's lora)
DORA_QV = "method={name: dora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}"
IA3 = "method={name: ia3, target_modules: [q_proj, v_proj, c_proj], feedforward_modules: [c_proj]}"
BITFIT = "method={name: bitfit}"
LAST_BLOCKS = "method={name: last_blocks, n: 2}"
FULL = "method={name: full}"
CONFIGS = {  # name -> (backend, recipe overrides)
    "mlx-lora-qv-fp32": ("mlx", ["method.r=8", "method.target_modules=[q_proj,v_proj]"]),
    "mlx-lora-all-r64-fp32": ("mlx", ["method.r=64", f"method.target_modules={ALL}"]),
    "mlx-qlora-all-nf4": ("mlx", ["method.r=16", f"method.target_modules={ALL}", "quantize.type=nf4"]),
    "mlx-lora-all-affine4": ("mlx", ["method.r=16", f"method.target_modules={ALL}", "quantize.type=affine",
                                     "quantize.bits=4", "quantize.group_size=64"]),
    "mlx-lora-all-affine8": ("mlx", ["method.r=16", f"method.target_modules={ALL}", "quantize.type=affine",
                                     "quantize.bits=8", "quantize.group_size=64"]),
    "torch-lora-qv-fp32": ("torch", ["method.r=8", "method.target_modules=[q_proj,v_proj]"]),
    "torch-qlora-all-nf4": ("torch", ["method.r=16", f"method.target_modules={ALL}", "quantize.type=nf4"]),
    "mlx-lora-all-checkpointed": ("mlx", ["method.r=16", f"method.target_modules={ALL}",
                                          "train.gradient_checkpointing=true"]),
    "torch-lora-all-checkpointed": ("torch", ["method.r=16", f"method.target_modules={ALL}",
                                              "train.gradient_checkpointing=true"]),
    "mlx-lora-all-bf16": ("mlx", ["method.r=16", f"method.target_modules={ALL}", "dtype=bfloat16"]),
    "mlx-qlora-all-nf4-bf16": ("mlx", ["method.r=16", f"method.target_modules={ALL}", "quantize.type=nf4",
                                       "dtype=bfloat16"]),
    # bfloat16 matmuls run ~100x slower than float32 on this AVX2-only CPU: a smaller batch
    "torch-lora-all-bf16": ("torch", ["method.r=16", f"method.target_modules={ALL}", "dtype=bfloat16",
                                      "train.batch_size=4"]),
    # one row per method on each backend, float32 (bitfit, last_blocks and full train base parameters:
    # float32 only); DoRA also on all layers, where its row norms and kept outputs weigh most
    "mlx-dora-qv-fp32": ("mlx", [DORA_QV]),
    "torch-dora-qv-fp32": ("torch", [DORA_QV]),
    "mlx-dora-all-r16-fp32": ("mlx", [f"method={{name: dora, r: 16, target_modules: {ALL}}}"]),
    "torch-dora-all-r16-fp32": ("torch", [f"method={{name: dora, r: 16, target_modules: {ALL}}}"]),
    "mlx-ia3-fp32": ("mlx", [IA3]),
    "torch-ia3-fp32": ("torch", [IA3]),
    "mlx-bitfit-fp32": ("mlx", [BITFIT]),
    "torch-bitfit-fp32": ("torch", [BITFIT]),
    "mlx-last-blocks-2-fp32": ("mlx", [LAST_BLOCKS]),
    "torch-last-blocks-2-fp32": ("torch", [LAST_BLOCKS]),
    "mlx-full-fp32": ("mlx", [FULL]),
    "torch-full-fp32": ("torch", [FULL]),
    # part 2: modules, virtual tokens and interventions, with compare_torch's settings
    **{f"{backend}-{name}-fp32": (backend, [section]) for name, section in (
        ("adapter-houlsby", "method={name: adapter, style: houlsby}"),
        ("adapter-pfeiffer", "method={name: adapter, style: pfeiffer}"),
        ("prompt-20", "method={name: prompt, n: 20}"),
        ("ptuning-mlp-20", "method={name: ptuning, n: 20, encoder: mlp}"),
        ("prefix-20", "method={name: prefix, n: 20}"),
        ("loreft-r4", "method={name: loreft, r: 4}"),
    ) for backend in ("mlx", "torch")},
}


def config_method(name: str) -> str:
    """The method a configuration trains (its recipe overrides' method.name; lora otherwise)."""
    import yaml

    for item in CONFIGS[name][1]:
        if item.startswith("method="):
            return yaml.safe_load(item.split("=", 1)[1])["name"]
    return "lora"


def recipe(shape: str, overrides: list[str], batch: int, tokens: int):
    from benchmarks.compare_torch import model_dir
    from twintune.recipe import load_recipe

    return load_recipe("recipes/demo-financial-sentiment.yaml", [
        f"model={model_dir(shape)}", "data.synthetic_size=60", f"train.batch_size={batch}",
        f"data.max_length={tokens}", *overrides])


def child(name: str, shape: str, batch: int, tokens: int, steps: int) -> dict:
    from twintune.backends import backend_class
    from twintune.data.batching import Batch
    from twintune.memory import estimate_memory
    from twintune.train.build import prepare

    backend, overrides = CONFIGS[name]
    r = recipe(shape, overrides, batch, tokens)
    batch = r.train.batch_size  # a configuration may set its own
    backend_class(backend)
    if backend == "torch":  # what the torch backend imports lazily belongs to the baseline
        import bitsandbytes  # noqa: F401
        import transformers.models.gpt_neo.modeling_gpt_neo  # noqa: F401
    else:
        import mlx.core as mx
    baseline = rss_mb()
    run = prepare(r, backend, with_data=False)
    estimate = estimate_memory(run.spec, run.method, r.quantization(), batch, tokens, backend,
                               gradient_checkpointing=r.train.gradient_checkpointing, dtype=r.dtype)

    reset_peak_rss()
    if backend == "mlx":
        mx.reset_peak_memory()
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ids = rng.integers(0, run.spec.vocab_size, (batch, tokens), dtype=np.int32)
        answer = (np.arange(batch) * tokens + tokens - 2).astype(np.int32)
        b = Batch(input_ids=ids, target_positions=answer, targets=ids[:, -1].copy(), answer_positions=answer,
                  labels=np.zeros(batch, np.int32), lengths=np.full(batch, tokens))
        run.backend.forward_backward(b, 1.0 / batch)
        run.backend.optimizer_step(1e-4, 1.0)
        times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times[1:] or times)  # the first step builds optimizer state and caches
    measured = mx.get_peak_memory() / 2**20 if backend == "mlx" else peak_rss_mb() - baseline
    predicted = estimate.training_peak / 2**20
    return {"config": name, "backend": backend, "method": r.method.name, "overrides": overrides, "shape": shape,
            "batch": f"{batch}x{tokens}", "trainable_parameters": estimate.trainable_parameters,
            "plan_trainable_parameters": run.plan.trainable_parameters(),
            "estimate_mb": {k: round(v, 1) for k, v in estimate.rows()},
            "measured_peak_mb": round(measured, 1), "step_seconds": round(step_seconds, 3),
            "tokens_per_s": round(batch * tokens / step_seconds, 1), "baseline_rss_mb": round(baseline, 1),
            "estimate_over_measured": round(predicted / measured, 3),
            "within_20_percent": bool(abs(predicted / measured - 1) <= 0.2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="125m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--methods", default=None, help="only the configurations of these methods (lora,dora,...)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results/*.json")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.batch, args.tokens, args.steps)))
        return

    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.methods:
        names = [n for n in names if config_method(n) in args.methods.split(",")]
        if not names:
            parser.error(f"--methods {args.methods}: no configuration trains these")
    rows = []
    for name in names:
        row = run_child("benchmarks.memory_estimate", ["--child", name, "--shape", args.shape, "--batch",
                                                       str(args.batch), "--tokens", str(args.tokens),
                                                       "--steps", str(args.steps)], mlx=CONFIGS[name][0] == "mlx")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"GPT-Neo {args.shape} shape, batch {args.batch} x {args.tokens} tokens, {args.steps} AdamW steps")
    print(f"{'config':26s} {'method':12s} {'trainable':>10s} {'tokens/s':>9s} {'estimate MB':>12s} "
          f"{'measured MB':>12s} {'est/meas':>9s}  within 20%")
    for row in rows:
        print(f"{row['config']:26s} {row.get('method', 'lora'):12s} {row['trainable_parameters']:10d} "
              f"{row.get('tokens_per_s', 0):9.1f} {row['estimate_mb']['training peak']:12.1f} "
              f"{row['measured_peak_mb']:12.1f} {row['estimate_over_measured']:9.3f}  "
              f"{'yes' if abs(row['estimate_over_measured'] - 1) <= 0.2 else 'NO'}")
    within = sum(abs(row["estimate_over_measured"] - 1) <= 0.2 for row in rows)
    print(f"{within} of {len(rows)} estimates within 20% of the measured peak"
          + ("" if within == len(rows) else ": outside are " + ", ".join(
              r["config"] for r in rows if abs(r["estimate_over_measured"] - 1) > 0.2)))
    if names == list(CONFIGS):
        subset = ""
    elif args.methods and args.configs == ",".join(CONFIGS):
        subset = "_" + args.methods.replace(",", "-")
    else:
        subset = "_" + "-".join(names)
    if not args.no_save:
        path = write_result(f"memory_estimate_{args.shape}{subset}", {"rows": rows, "within_20_percent": within})
        print(f"wrote {path}")
    print(json.dumps({"configs": len(rows), "within_20_percent": within}))


if __name__ == "__main__":
    main()
