"""What the shared counter-based dropout masks cost against each framework's native dropout, 125M shape.

    python -m benchmarks.dropout_cost [--shape 125m] [--batch 16] [--tokens 64] [--repeats 11] [--warmup 2]
                                      [--backends torch,mlx]

One training step (`forward_backward` + `optimizer_step`, as benchmarks.memory_estimate times it)
of LoRA r=8 on q_proj + v_proj with method.dropout 0.1, on a random-weight GPT-Neo of the shape,
batch x tokens real tokens (no padding), in these variants:

  none    no dropout: LoRALinear's `dropout` replaced by the identity (what dropout 0 does)
  shared  the shipped dropout: the shared counter-based masks (twintune/dropout.py)
  native  the framework's own dropout, as the code had it before the shared masks:
          torch.nn.functional.dropout on torch, an `mx.random.bernoulli` mask on MLX
  compiled  (torch only) a candidate fix: the shipped masks' maths under torch.compile
          (dynamic shapes), one fused loop as MLX's mx.compile already makes it; the same masks

Each backend runs in its own process (OpenBLAS preloaded for MLX only); inside it the variants run
interleaved, step by step in a rotating order, so the machine's ups and downs touch them all
alike. Step time: the median of --repeats steps after --warmup steps each. Peak memory per step:
`mx.get_peak_memory()` on MLX, the process's peak RSS on torch (reset before each step).
It also times the dropout function alone on the largest dropout input (batch x tokens x hidden,
the input of q_proj and v_proj), which a step calls twice per block; on torch also a second
candidate there, the shipped hash on one int64 buffer updated in place. Each candidate's output
is checked equal to the shipped dropout's, bit for bit.

The goal (issue): the shared masks cost at most 3 % of step time against native dropout. Before
each backend it waits for a quiet machine (1-minute load under 1.2, up to 15 minutes) and records
the load. The last line is one JSON object with the percentages.
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
import hashlib
import importlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import announce_machine, peak_rss_mb, reset_peak_rss, rss_mb, run_child, write_result

P = 0.1
GOAL = 0.03  # the shared masks' cost against native dropout, as a share of step time
LORA = ["method.r=8", "method.target_modules=[q_proj,v_proj]", f"method.dropout={P}"]
QUIET_LOAD, QUIET_WAIT, QUIET_POLL = 1.2, 900, 30  # load limit; seconds to wait at most; between looks


def native_dropout_torch(x, p: float, stream: int, training: bool):
    """torch's own dropout with LoRALinear's signature (the stream is what native dropout has no use for)."""
    import torch.nn.functional as F

    return F.dropout(x, p, training)


def native_dropout_mlx(x, p: float, stream: int, training: bool):
    """MLX's dropout as the code had it before the shared masks (and as mlx.nn.Dropout does it)."""
    import mlx.core as mx

    if not training or p == 0:
        return x
    keep = mx.random.bernoulli(1 - p, x.shape)
    return (keep * x) * (1 / (1 - p))


def no_dropout(x, p: float, stream: int, training: bool):
    """Dropout 0: what LoRALinear does when method.dropout is 0."""
    return x


def compiled_dropout_torch() -> Callable:
    """Candidate fix: the shipped torch dropout's maths under torch.compile, so the hash's dozen int64
    ops become one loop over the elements instead of a dozen full-size temporaries."""
    import torch

    from twintune.dropout import current_dropout_key, keep_bits, keep_threshold, layer_salt

    @torch.compile(dynamic=True)  # batch shapes vary: one graph for all
    def masked(x, salt, threshold: int, scale: float):
        index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
        return torch.where(keep_bits(index, salt) >= threshold, x * scale, torch.zeros((), dtype=x.dtype))

    def dropout(x, p: float, stream: int, training: bool):
        if not training or p == 0:
            return x
        return masked(x, layer_salt(current_dropout_key(), stream), keep_threshold(p), 1 / (1 - p))
    return dropout


def inplace_dropout_torch(x, p: float, stream: int, training: bool):
    """Candidate fix without a compiler: the same hash (twintune/dropout.py: mix32) on one int64 buffer
    updated in place, so each step of the hash writes no new full-size tensor."""
    import torch

    from twintune.dropout import _MULTIPLIER, MASK32, current_dropout_key, keep_threshold, layer_salt

    key = current_dropout_key()
    h = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    h.bitwise_xor_(layer_salt(key, stream))
    for _ in range(2):
        h.bitwise_xor_(h >> 16).mul_(_MULTIPLIER).bitwise_and_(MASK32)
    h.bitwise_xor_(h >> 16)
    return torch.where(h >= keep_threshold(p), x * (1 / (1 - p)), torch.zeros((), dtype=x.dtype))


def dropout_functions(backend: str) -> dict:
    """Variant -> the function LoRALinear calls as its module-level `dropout`."""
    shipped = importlib.import_module(f"twintune.backends.{backend}.dropout").dropout
    if backend == "mlx":
        return {"none": no_dropout, "shared": shipped, "native": native_dropout_mlx}
    return {"none": no_dropout, "shared": shipped, "native": native_dropout_torch, "compiled": compiled_dropout_torch()}


def key_context(backend: str, key: int) -> AbstractContextManager:
    """The context that hands the shared dropout its key, wherever this version of the code keeps it."""
    import twintune.dropout as shared

    module = importlib.import_module(f"twintune.backends.{backend}.dropout")
    masks = getattr(module, "dropout_masks", None) or shared.dropout_masks
    if backend == "torch":
        import torch

        return masks(torch.tensor(key, dtype=torch.int64))
    import mlx.core as mx

    return masks(mx.array(key, dtype=mx.uint32))


def recipe(shape: str, batch: int, tokens: int):
    from benchmarks.compare_torch import model_dir
    from twintune.recipe import load_recipe

    return load_recipe("recipes/demo-financial-sentiment.yaml", [
        f"model={model_dir(shape)}", "data.synthetic_size=60", f"train.batch_size={batch}",
        f"data.max_length={tokens}", *LORA])


def random_batch(rng: np.random.Generator, vocab: int, batch: int, tokens: int):
    """batch x tokens real tokens (no padding), the label at each row's second-to-last position."""
    from twintune.data.batching import Batch

    ids = rng.integers(0, vocab, (batch, tokens), dtype=np.int32)
    answer = (np.arange(batch) * tokens + tokens - 2).astype(np.int32)
    return Batch(input_ids=ids, target_positions=answer, targets=ids[:, -1].copy(), answer_positions=answer,
                 labels=np.zeros(batch, np.int32), lengths=np.full(batch, tokens))


def child(backend: str, shape: str, batch: int, tokens: int, repeats: int, warmup: int) -> dict:
    from twintune.dropout import dropout_key
    from twintune.train.build import prepare

    if backend == "mlx":
        import mlx.core as mx
    lora = importlib.import_module(f"twintune.backends.{backend}.lora")
    functions = dropout_functions(backend)
    run = prepare(recipe(shape, batch, tokens), backend, with_data=False)
    rng = np.random.default_rng(0)
    variants = list(functions)
    times = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    for step in range(warmup + repeats):
        b = random_batch(rng, run.spec.vocab_size, batch, tokens)
        # rotate the order, so no variant always runs first (after a fresh batch) or last
        turn = step % len(variants)
        for variant in variants[turn:] + variants[:turn]:
            lora.dropout = functions[variant]
            reset_peak_rss()
            if backend == "mlx":
                mx.reset_peak_memory()
            start = time.perf_counter()
            run.backend.forward_backward(b, 1.0 / batch, dropout_key(0, step, 0))
            run.backend.optimizer_step(1e-4, 1.0)
            seconds = time.perf_counter() - start
            if step >= warmup:
                times[variant].append(seconds)
                peaks[variant].append(mx.get_peak_memory() / 2**20 if backend == "mlx" else peak_rss_mb())
    lora.dropout = functions["shared"]
    rows = {v: {"step_seconds": statistics.median(times[v]), "step_times": times[v],
                "real_tokens_per_s": batch * tokens / statistics.median(times[v]),
                "peak_mb": max(peaks[v])} for v in variants}
    adapted = sum(1 for name in run.method.targets(run.spec.linear_layers()))
    return {"backend": backend, "shape": shape, "batch": f"{batch}x{tokens}", "real_tokens": batch * tokens,
            "repeats": repeats, "warmup": warmup, "dropout_calls_per_step": adapted,
            "threads": _threads(backend), "rss_after_mb": rss_mb(), "rows": rows,
            "paired_over_native": {v: statistics.median(t / n for t, n in zip(times[v], times["native"]))
                                   for v in variants},
            "mask_alone": mask_alone(backend, functions, (batch, tokens, run.spec.hidden_size))}


def mask_alone(backend: str, functions: dict, shape: tuple[int, ...], repeats: int = 21) -> dict:
    """Forward time of the dropout function alone on one input of `shape` (ms, median): shared against native."""
    from benchmarks.common import median_time

    if backend == "torch":
        import torch

        x = torch.randn(*shape)
        run = lambda f: f(x, P, 12345, True)  # noqa: E731
    else:
        import mlx.core as mx

        x = mx.random.normal(shape)
        mx.eval(x)
        run = lambda f: mx.eval(f(x, P, 12345, True))  # noqa: E731
    candidates = {k: f for k, f in functions.items() if k != "none"}
    if backend == "torch":
        candidates["inplace"] = inplace_dropout_torch
    out = {"shape": list(shape)}
    with key_context(backend, 7):
        for variant, function in candidates.items():
            if variant not in ("shared", "native"):  # a candidate fix must draw the shipped masks
                assert torch.equal(function(x, P, 12345, True), functions["shared"](x, P, 12345, True)), variant
            seconds, _ = median_time(lambda: run(function), repeats, warmup=3)
            out[f"{variant}_ms"] = seconds * 1e3
    return out


def _threads(backend: str) -> int | None:
    if backend == "torch":
        import torch

        return torch.get_num_threads()
    return None


def wait_for_quiet() -> dict:
    """Wait (up to QUIET_WAIT s) until the 1-minute load is under QUIET_LOAD: another process's work
    on these 2 cores would land in some steps and not others."""
    start = time.monotonic()
    load = os.getloadavg()[0]
    while load >= QUIET_LOAD and time.monotonic() - start < QUIET_WAIT:
        print(f"  load {load:.2f} >= {QUIET_LOAD}: waiting {QUIET_POLL} s for a quiet machine", flush=True)
        time.sleep(QUIET_POLL)
        load = os.getloadavg()[0]
    return {"load_1min": load, "waited_s": round(time.monotonic() - start), "quiet": load < QUIET_LOAD}


def code_version() -> dict:
    """A short hash of each dropout implementation timed: the code moves, the figures belong to one version."""
    root = Path(__file__).parent.parent / "twintune"
    files = ["dropout.py", "backends/torch/dropout.py", "backends/mlx/dropout.py"]
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:12] for f in files}


def costs(result: dict) -> dict:
    """Each dropout's cost as a share of step time, against native dropout and against none; and
    what the shared masks alone add per step (calls per step x their extra time over native's)."""
    rows, paired = result["rows"], result["paired_over_native"]
    step = {v: row["step_seconds"] for v, row in rows.items()}
    out = {"native_vs_none": step["native"] / step["none"] - 1}
    for v in step.keys() - {"none", "native"}:
        out[f"{v}_vs_native"] = step[v] / step["native"] - 1
        out[f"{v}_vs_native_paired"] = paired[v] - 1
        out[f"{v}_vs_none"] = step[v] / step["none"] - 1
    mask = result["mask_alone"]
    extra = result["dropout_calls_per_step"] * (mask["shared_ms"] - mask["native_ms"]) / 1e3
    out["mask_alone_extra_per_step_vs_native"] = extra / step["native"]
    return out


def print_table(results: dict[str, dict], shares: dict[str, dict]) -> None:
    print(f"{'backend':8s} {'variant':9s} {'step s':>7s} {'real tok/s':>11s} {'peak MB':>8s} {'vs none':>8s} "
          f"{'vs native':>10s} {'(paired)':>9s} {'mask alone ms':>14s}")
    for backend, result in results.items():
        share, mask = shares[backend], result["mask_alone"]
        none = result["rows"]["none"]["step_seconds"]
        for variant, row in result["rows"].items():
            vs_none = "" if variant == "none" else f"{100 * (row['step_seconds'] / none - 1):+7.1f}%"
            vs_native = f"{100 * share[f'{variant}_vs_native']:+9.1f}%" if f"{variant}_vs_native" in share else ""
            paired = f"{100 * share[f'{variant}_vs_native_paired']:+8.1f}%" if vs_native else ""
            alone = f"{mask[f'{variant}_ms']:14.2f}" if f"{variant}_ms" in mask else ""
            print(f"{backend:8s} {variant:9s} {row['step_seconds']:7.3f} {row['real_tokens_per_s']:11.1f} "
                  f"{row['peak_mb']:8.1f} {vs_none:>8s} {vs_native:>10s} {paired:>9s} {alone:>14s}")
        if "inplace_ms" in mask:
            print(f"{backend:8s} {'inplace':9s} {'':7s} {'':11s} {'':8s} {'':8s} {'':10s} {'':9s} "
                  f"{mask['inplace_ms']:14.2f}  (timed alone only)")
    for backend, share in shares.items():
        over = share["shared_vs_native"] - GOAL
        mask = results[backend]["mask_alone"]
        print(f"{backend}: the shared masks cost {100 * share['shared_vs_native']:+.1f}% of step time against native "
              f"dropout (paired {100 * share['shared_vs_native_paired']:+.1f}%), {100 * share['shared_vs_none']:+.1f}% "
              f"against none; goal <= {100 * GOAL:.0f}%: "
              + ("met" if over <= 0 else f"missed by {100 * over:.1f} points") +
              f". Mask alone: {mask['shared_ms']:.2f} ms shared vs {mask['native_ms']:.2f} ms native per call, "
              f"x {results[backend]['dropout_calls_per_step']} calls = "
              f"{100 * share['mask_alone_extra_per_step_vs_native']:+.1f}% of the step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="125m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.batch, args.tokens, args.repeats, args.warmup)))
        return

    announce_machine()
    from benchmarks.compare_torch import model_dir

    model_dir(args.shape)  # written once, before any timing
    results, loads = {}, {}
    for backend in args.backends.split(","):
        before = wait_for_quiet()
        results[backend] = run_child("benchmarks.dropout_cost", [
            "--child", backend, "--shape", args.shape, "--batch", str(args.batch), "--tokens", str(args.tokens),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup)], mlx=backend == "mlx")
        loads[backend] = {"before": before, "load_1min_after": os.getloadavg()[0]}
        print(f"  {backend}: load {before['load_1min']:.2f} before (waited {before['waited_s']} s), "
              f"{loads[backend]['load_1min_after']:.2f} after", flush=True)
    shares = {backend: costs(result) for backend, result in results.items()}
    print(f"GPT-Neo {args.shape} shape, LoRA r=8 q_proj+v_proj, dropout {P}, batch {args.batch} x {args.tokens} "
          f"real tokens; median of {args.repeats} steps after {args.warmup}; paired = median of per-step ratios")
    print_table(results, shares)
    # the default run owns results/dropout_cost.json; other shapes and subsets get their own file
    suffix = ("" if args.shape == "125m" else f"_{args.shape}") + (
        "" if args.backends == "torch,mlx" else "_" + args.backends.replace(",", "-"))
    write_result(f"dropout_cost{suffix}",
                 {"p": P, "goal": GOAL, "code": code_version(), "load": loads, "results": results, "costs": shares})
    percent = {b: {k: round(100 * v, 2) for k, v in share.items()} for b, share in shares.items()}
    print(json.dumps({b: {**percent[b], "goal_met": share["shared_vs_native"] <= GOAL} for b, share in shares.items()}))


if __name__ == "__main__":
    main()
