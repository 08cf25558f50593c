"""The loss in chunks of rows (backends/base.py loss_chunks): peak memory and seconds per step of a
causal-LM step whose (target rows x vocabulary) logits would be large, with and without chunks.

    python -m benchmarks.chunked_loss [--shape 125m] [--length 512] [--batch 8] [--steps 3]
                                      [--backends torch,mlx] [--no-save]

The demo recipe's synthetic sentences as a causal-LM corpus (`task: causal_lm`, packed into rows of
--length tokens), LoRA r 8 on q_proj and v_proj, on the random-weight GPT-Neo of --shape
(compare_torch's): --batch rows of --length tokens give batch x (length - 1) target rows, each with
the whole vocabulary's logits (8 x 511 x 50257 values, 822 MB in float32, at the defaults). Per
backend, two child processes: "whole" (LOSS_CHUNK_VALUES raised past any batch: one chunk) and
"chunks" (the default: 2**26 values, 1335 rows a chunk at this vocabulary). Each runs --steps
training steps after one warm-up step; printed: the step's median seconds, the process's peak RSS
(torch and MLX) and MLX's own peak of its arrays (mx.get_peak_memory), the first step's loss (the
same with and without chunks). Writes results/chunked_loss_<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks.common import announce_machine, peak_rss_mb, run_child, write_result


def child(backend: str, shape: str, length: int, batch: int, steps: int, chunked: bool) -> dict:
    if backend == "mlx":
        import mlx.core as mx
    import twintune.backends.base as base
    from benchmarks.compare_torch import model_dir
    from twintune.recipe import load_recipe
    from twintune.train.build import prepare
    from twintune.train.step import train_step

    if not chunked:
        base.LOSS_CHUNK_VALUES = 2**62
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", [
        f"model={model_dir(shape)}", "task=causal_lm", "data.synthetic_size=2000", f"data.max_length={length}",
        f"train.batch_size={batch}", f"train.max_steps={steps + 1}", "train.warmup_steps=0",
        "method={name: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}"])
    run = prepare(recipe, backend)
    batches = run.order.step_batches(0)
    rows = sum(b.n_targets for b in batches)
    losses, seconds = [], []
    for step in range(steps + 1):
        start = time.perf_counter()
        losses.append(train_step(run, step)["loss"])
        seconds.append(time.perf_counter() - start)
    return {"backend": backend, "chunked": chunked, "target_rows": rows, "vocabulary": run.spec.vocab_size,
            "chunks": len(base.loss_chunks(rows, run.spec.vocab_size)),
            "seconds_per_step": statistics.median(seconds[1:]), "first_loss": losses[0],
            "peak_rss_mb": peak_rss_mb(),
            "mlx_peak_mb": mx.get_peak_memory() / 2**20 if backend == "mlx" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="125m")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, chunked = args.child.split(",")
        print(json.dumps(child(backend, args.shape, args.length, args.batch, args.steps, chunked == "1")))
        return
    announce_machine()
    rows = [run_child("benchmarks.chunked_loss", ["--child", f"{backend},{int(chunked)}", "--shape", args.shape,
                                                  "--length", str(args.length), "--batch", str(args.batch),
                                                  "--steps", str(args.steps)], mlx=backend == "mlx")
            for backend in args.backends.split(",") for chunked in (False, True)]
    print(f"GPT-Neo {args.shape}, causal LM, {args.batch} rows of {args.length} tokens, LoRA r 8 (q_proj, v_proj)")
    print(f"{'backend':8s} {'loss':7s} {'chunks':>6s} {'target rows':>11s} {'s/step':>7s} {'peak RSS MB':>11s} "
          f"{'mx peak MB':>10s} {'first loss':>11s}")
    for row in rows:
        mlx_peak = f"{row['mlx_peak_mb']:10.0f}" if row["mlx_peak_mb"] is not None else f"{'–':>10s}"
        print(f"{row['backend']:8s} {'chunks' if row['chunked'] else 'whole':7s} {row['chunks']:6d} "
              f"{row['target_rows']:11d} {row['seconds_per_step']:7.2f} {row['peak_rss_mb']:11.0f} {mlx_peak} "
              f"{row['first_loss']:11.6f}")
    if not args.no_save:
        print(f"wrote {write_result(f'chunked_loss_{args.shape}', {'rows': rows, 'length': args.length, 'batch': args.batch})}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
