"""How far the backends drift apart over the whole demo, against how far torch drifts from itself.

    python -m benchmarks.parity_drift [--steps N] [--seeds 0,1,2,3] [--skip-float64] [--set KEY=VALUE ...]
                                      [--label NAME]

Trains the float32 demo recipe (recipes/demo-financial-sentiment.yaml, its whole run unless --steps;
--set changes it for every run: `--set quantize.type=nf4 --label qlora` is the QLoRA demo) four times,
each in its own process: on MLX (OpenBLAS preloaded, its default 2 threads), on MLX with OpenBLAS
on 1 thread, on torch with 1 thread and on torch with 2 threads. Per step it compares the losses
as |a - b| / |b|:

  cross-backend          MLX vs torch (1 thread)
  same-backend (torch)   torch (2 threads) vs torch (1 thread): the rounding a framework changes
                         when only its thread count does, the yardstick of the standard
  same-backend (MLX)     MLX (OpenBLAS 1 thread) vs MLX (2 threads): the same on MLX. On the
                         tiny demo model torch splits no operation across threads, so its two
                         runs are bit for bit the same and its yardstick is zero; OpenBLAS does
                         split MLX's GEMMs, so this one is not.

The standard (README, "What is the same on both backends"): cross-backend drift no larger than
2x the same-backend drift, with the same final validation predictions. Drift is compared two
ways, and both must hold (judged against each yardstick):
  - the median relative difference over the last 50 steps: cross <= 2 x same;
  - the first step whose relative difference passes 1e-3: cross no earlier than half of
    same's ("never" counts as one step past the run).

Float32 drift is chaotic: one run is one sample, and its final figures move by several times from
seed to seed (benchmarks/README.md). So the standard is judged over seeds (by default 0,1,2,3:
each seed repeats the four runs), on each yardstick whose drift is not exactly zero:
  - the median over seeds of each seed's ratio cross / same (median difference, last 50 steps) <= 2;
  - the median over seeds of the first step past 1e-3: cross no earlier than half of same's;
  - final predictions: cross-backend pairs differ in no more validation examples, summed over the
    seeds, than the same-backend pairs do. float32 predictions on examples near a decision
    boundary flip with rounding; a framework that flips k of them against itself cannot be asked
    to flip none against another framework.
A yardstick that is exactly zero at every seed (torch's thread count on the tiny model) is
reported, not judged: no other rounding, however small, could be "no larger" than none.
docs/architecture.md ("The float32 standard") says why the standard is judged this way.
With a single --seeds value, that seed's verdicts are printed alone (the rules above, one sample).

Then, unless --skip-float64 (on the first seed), the same demo in float64 on MLX and torch: per-step losses within
1e-8 relative, and each final trainable array within 1e-8 of its largest value.

Prints a table, plots the per-step differences to results/parity_drift[_LABEL].png (log scale) and
writes results/parity_drift[_LABEL].json; the last line is one JSON object with the verdicts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, announce_machine, run_child, write_result

RECIPE = "recipes/demo-financial-sentiment.yaml"
THRESHOLD = 1e-3  # the float32 parity tests' tolerance
TAIL = 50  # steps at the end whose median measures the drift
FLOAT64_TOLERANCE = 1e-8
# name -> (backend, threads: torch's intra-op threads, or OpenBLAS's for MLX; 0 = the default)
FLOAT32_RUNS = {"mlx": ("mlx", 0), "mlx_1": ("mlx", 1), "torch_1": ("torch", 1), "torch_2": ("torch", 2)}
# pair -> (a, b): |a - b| / |b|
PAIRS = {"cross-backend": ("mlx", "torch_1"), "same-backend (torch)": ("torch_2", "torch_1"),
         "same-backend (MLX)": ("mlx_1", "mlx")}
YARDSTICKS = ("same-backend (torch)", "same-backend (MLX)")
STYLES = {"cross-backend": ("MLX vs torch (1 thread), float32", "tab:red"),
          "same-backend (torch)": ("torch (2 threads) vs torch (1 thread), float32", "tab:blue"),
          "same-backend (MLX)": ("MLX (OpenBLAS 1 thread) vs MLX (2 threads), float32", "tab:green")}


def child(backend: str, threads: int, dtype: str, steps: int, state_path: str, seed: int = 0,
          overrides: list[str] = ()) -> dict:
    """Train the demo on one backend; per-step losses, validation predictions, the final adapter in an npz."""
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)  # before any work: the pool is sized once
    from twintune.recipe import load_recipe
    from twintune.train.build import prepare
    from twintune.train.step import train_step
    from twintune.train.evaluate import evaluate

    run = prepare(load_recipe(RECIPE, [*overrides, f"dtype={dtype}", f"seed={seed}",
                                       *([f"train.max_steps={steps}"] if steps else [])]), backend)
    steps = run.total_steps
    start = time.perf_counter()
    losses = [train_step(run, step)["loss"] for step in range(steps)]
    seconds = time.perf_counter() - start
    report = evaluate(run)
    np.savez(state_path, **run.backend.trainable_state())
    return {"backend": backend, "threads": threads or None, "dtype": dtype, "steps": steps,
            "seconds_per_step": seconds / steps, "losses": losses, "predictions": report.predictions,
            "val_accuracy": report.accuracy}


def train(name: str, backend: str, threads: int, dtype: str, steps: int, scratch: Path, seed: int = 0,
          overrides: list[str] = ()) -> dict:
    """One training run in its own process (its own thread pool); the final adapter is loaded back."""
    state_path = scratch / f"{name}-{dtype}-{seed}.npz"
    # OpenBLAS sizes its pool when it loads (preloaded, before Python runs): tell it by environment
    env = {"OPENBLAS_NUM_THREADS": str(threads)} if backend == "mlx" and threads else None
    row = run_child("benchmarks.parity_drift", ["--child", backend, "--threads", str(threads), "--dtype", dtype,
                                                "--steps", str(steps), "--state", str(state_path), "--seed", str(seed),
                                                *[f"--set={item}" for item in overrides]],
                    timeout=3600, mlx=backend == "mlx", env=env)
    with np.load(state_path) as state:
        row["state"] = {k: state[k] for k in state.files}
    print(f"  {name} ({dtype}, seed {seed}): {row['seconds_per_step']:.3f} s/step, final loss {row['losses'][-1]:.6f}, "
          f"validation accuracy {row['val_accuracy']:.3f}", flush=True)
    return row


def relative(a: list[float], b: list[float]) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.abs(b)


def first_past(rel: np.ndarray, threshold: float) -> int | None:
    """The first (1-based) step whose relative difference passes the threshold, or None."""
    past = np.flatnonzero(rel > threshold)
    return int(past[0]) + 1 if past.size else None


def state_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest, over trainable arrays, of max |a - b| / max |b|: the adapters' gap at their own scale."""
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max() / np.abs(b[k]).max()) for k in b)


def compare(a: dict, b: dict) -> dict:
    """One pair's drift: per-step relative loss differences and what the verdicts read from them."""
    rel = relative(a["losses"], b["losses"])
    differing = sum(x != y for x, y in zip(a["predictions"], b["predictions"]))
    return {"relative": rel.tolist(), "first_step_past_1e-3": first_past(rel, THRESHOLD), "max": float(rel.max()),
            "max_at_step": int(rel.argmax()) + 1, "final": float(rel[-1]),
            f"median_last_{TAIL}": float(statistics.median(rel[-TAIL:])),
            "predictions_agree": differing == 0, "predictions_differing": differing,
            "adapter_max_relative_difference": state_difference(a["state"], b["state"])}


def verdict(cross: dict, same: dict, steps: int) -> dict:
    """The standard: cross-backend drift no larger than 2x same-backend drift, same final predictions."""
    median_key = f"median_last_{TAIL}"
    # "never" counts as one step past the run: a pair that never passes 1e-3 drifted least
    cross_first = cross["first_step_past_1e-3"] or steps + 1
    same_first = same["first_step_past_1e-3"] or steps + 1
    checks = {
        f"{median_key}: cross <= 2 x same": cross[median_key] <= 2 * same[median_key],
        "first step past 1e-3: cross >= same / 2": cross_first >= same_first / 2,
        "final validation predictions agree (cross)": cross["predictions_agree"],
    }
    return {"checks": checks, "cross_over_same_median": cross[median_key] / same[median_key] if same[median_key]
            else None, "pass": all(checks.values())}


def float64_check(mlx: dict, torch: dict) -> dict:
    """float64: the algorithm is the same if losses and adapters agree to 1e-8, far below float32's rounding."""
    rel = relative(mlx["losses"], torch["losses"])
    state = state_difference(mlx["state"], torch["state"])
    return {"relative": rel.tolist(), "max_loss_relative_difference": float(rel.max()),
            "max_at_step": int(rel.argmax()) + 1, "max_adapter_relative_difference": state,
            "predictions_agree": mlx["predictions"] == torch["predictions"], "tolerance": FLOAT64_TOLERANCE,
            "pass": bool(rel.max() <= FLOAT64_TOLERANCE and state <= FLOAT64_TOLERANCE)}


def plot(pairs: dict[str, dict], float64: dict | None, path: Path) -> None:
    """Per-step relative loss differences on a log scale, with the 1e-3 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-17  # a log scale has no zero: steps that agree exactly are marked on this line
    fig, ax = plt.subplots(figsize=(9, 5.5))
    curves = [(pair["relative"], *STYLES[name]) for name, pair in pairs.items()]
    if float64:
        curves.append((float64["relative"], "MLX vs torch (1 thread), float64", "tab:gray"))
    for relative, label, color in curves:
        rel = np.asarray(relative)
        steps = np.arange(1, len(rel) + 1)
        exact = rel == 0
        if exact.all():  # no line to draw: say so in the legend
            label += ": equal at every step"
        ax.plot(steps, np.where(exact, np.nan, rel), color=color, lw=1.1, ls="--" if "float64" in label else "-",
                label=label)
        ax.plot(steps[exact], np.full(exact.sum(), floor), "|", color=color, ms=6)
    ax.axhline(THRESHOLD, color="black", lw=1, ls=":", label="1e-3 (float32 parity tests)")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("|a - b| / |b| of the training loss")
    ax.set_title(f"Demo recipe: per-step loss drift (ticks at {floor:g}: steps that agree exactly)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LABELS = {"cross-backend": "cross-backend: MLX vs torch(1)",
          "same-backend (torch)": "same-backend: torch(2) vs torch(1)",
          "same-backend (MLX)": "same-backend: MLX(1) vs MLX(2)"}


def print_table(pairs: dict[str, dict], checks: dict[str, dict]) -> None:
    median_key = f"median_last_{TAIL}"
    print(f"{'pair':36s} {'first > 1e-3':>12s} {'max':>9s} {'final':>9s} {'median last 50':>15s} "
          f"{'adapter':>9s} {'predictions':>12s}")
    for name, pair in pairs.items():
        first = pair["first_step_past_1e-3"] or "never"
        agree = "agree" if pair["predictions_agree"] else f"{pair['predictions_differing']} differ"
        print(f"{LABELS[name]:36s} {first!s:>12s} {pair['max']:9.2e} {pair['final']:9.2e} {pair[median_key]:15.2e} "
              f"{pair['adapter_max_relative_difference']:9.2e} {agree:>12s}")
    for yardstick, check in checks.items():
        ratio = check["cross_over_same_median"]
        print(f"standard against {yardstick} (cross-backend drift <= 2x same-backend drift, same predictions): "
              f"{'PASS' if check['pass'] else 'FAIL'}; median ratio cross/same "
              + (f"{ratio:.2f}" if ratio is not None else "infinite (the yardstick is exactly 0)"))
        for text, ok in check["checks"].items():
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")


def over_seeds(per_seed: dict[int, dict[str, dict]], steps: int) -> dict[str, dict]:
    """The standard judged over seeds, against each yardstick (see the module docstring)."""
    median_key = f"median_last_{TAIL}"
    cross = [pairs["cross-backend"] for pairs in per_seed.values()]
    first = lambda pair: pair["first_step_past_1e-3"] or steps + 1  # noqa: E731 - "never": one step past the run
    verdicts = {}
    for yardstick in YARDSTICKS:
        same = [pairs[yardstick] for pairs in per_seed.values()]
        if all(s[median_key] == 0 and s["predictions_differing"] == 0 for s in same):
            verdicts[yardstick] = {"checks": {}, "ratios": [], "median_ratio": None, "pass": None,
                                   "note": "not judged: the yardstick is exactly zero at every seed"}
            continue
        ratios = [c[median_key] / s[median_key] if s[median_key] else float("inf") for c, s in zip(cross, same)]
        ratio = statistics.median(ratios)
        cross_differing = sum(c["predictions_differing"] for c in cross)
        same_differing = sum(s["predictions_differing"] for s in same)
        checks = {
            "median over seeds of (cross / same median difference) <= 2": ratio <= 2,
            "median over seeds of the first step past 1e-3: cross >= same / 2":
                statistics.median(map(first, cross)) >= statistics.median(map(first, same)) / 2,
            f"differing final predictions over the seeds: cross {cross_differing} <= same {same_differing}":
                cross_differing <= same_differing,
        }
        verdicts[yardstick] = {"checks": checks, "ratios": ratios, "median_ratio": ratio,
                               "cross_differing": cross_differing, "same_differing": same_differing,
                               "pass": all(checks.values())}
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (default: the recipe's whole run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every run (repeatable), e.g. --set quantize.type=nf4")
    parser.add_argument("--label", default="", help="results/parity_drift_LABEL.json instead of parity_drift.json")
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated recipe seeds (the standard is judged over them)")
    parser.add_argument("--skip-float64", action="store_true", help="only the float32 drift")
    parser.add_argument("--child", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--state", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.dtype, args.steps, args.state, args.seed,
                               args.overrides)))
        return

    announce_machine()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    per_seed_runs, per_seed_pairs = {}, {}
    with tempfile.TemporaryDirectory(prefix="parity-drift-") as scratch:
        for seed in seeds:
            runs = {name: train(name, backend, threads, "float32", args.steps, Path(scratch), seed, args.overrides)
                    for name, (backend, threads) in FLOAT32_RUNS.items()}
            args.steps = next(iter(runs.values()))["steps"]  # the recipe's, when not given
            per_seed_pairs[seed] = {name: compare(runs[a], runs[b]) for name, (a, b) in PAIRS.items()}
            for row in runs.values():
                del row["state"]  # the adapters' differences are summarized in the pairs; the arrays stay out
            per_seed_runs[seed] = runs
        float64 = None
        if not args.skip_float64:
            mlx64 = train("mlx", "mlx", 0, "float64", args.steps, Path(scratch), seeds[0], args.overrides)
            torch64 = train("torch_1", "torch", 1, "float64", args.steps, Path(scratch), seeds[0], args.overrides)
            float64 = float64_check(mlx64, torch64)

    print(f"demo recipe{' with ' + ' '.join(args.overrides) if args.overrides else ''}, float32, {args.steps} steps; relative loss difference |a-b|/|b| per step; "
          f"adapter = max over arrays of max|diff| / max|value|")
    checks = {}
    for seed, pairs in per_seed_pairs.items():
        print(f"seed {seed}:")
        checks[seed] = {name: verdict(pairs["cross-backend"], pairs[name], args.steps) for name in YARDSTICKS}
        print_table(pairs, checks[seed])
    seeds_verdict = over_seeds(per_seed_pairs, args.steps) if len(seeds) > 1 else None
    for yardstick, check in (seeds_verdict or {}).items():
        if check["pass"] is None:
            print(f"over seeds {args.seeds}, against {yardstick}: {check['note']}")
            continue
        ratios = ", ".join(f"{r:.2f}" for r in check["ratios"])
        print(f"over seeds {args.seeds}, against {yardstick}: {'PASS' if check['pass'] else 'FAIL'}; "
              f"cross/same ratios {ratios}; median {check['median_ratio']:.2f}")
        for text, ok in check["checks"].items():
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    if float64:
        agree = "agree" if float64["predictions_agree"] else "differ"
        print(f"float64, MLX vs torch (1 thread), seed {seeds[0]}: max loss relative difference "
              f"{float64['max_loss_relative_difference']:.2e} (step {float64['max_at_step']}), max adapter difference "
              f"{float64['max_adapter_relative_difference']:.2e} of scale, predictions {agree}: "
              f"{'PASS' if float64['pass'] else 'FAIL'} (tolerance {FLOAT64_TOLERANCE:g})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"parity_drift_{args.label}" if args.label else "parity_drift"
    png = RESULTS / f"{name}.png"
    plot(per_seed_pairs[seeds[0]], float64, png)
    print(f"plot (seed {seeds[0]}): {png}")
    first = per_seed_pairs[seeds[0]]
    write_result(name, {"recipe": RECIPE, "overrides": args.overrides, "steps": args.steps, "threshold": THRESHOLD, "tail": TAIL,
                                  "seeds": seeds, "runs": per_seed_runs, "pairs": per_seed_pairs,
                                  "verdicts": checks, "verdicts_over_seeds": seeds_verdict, "float64": float64})
    summary = {"first_step_past_1e-3": {name: pair["first_step_past_1e-3"] for name, pair in first.items()},
               "cross_predictions_agree": all(p["cross-backend"]["predictions_agree"] for p in per_seed_pairs.values()),
               f"seed_{seeds[0]}_pass": {name: check["pass"] for name, check in checks[seeds[0]].items()}}
    if seeds_verdict:
        summary["standard_pass_over_seeds"] = {name: check["pass"] for name, check in seeds_verdict.items()}
        judged = [check["pass"] for check in seeds_verdict.values() if check["pass"] is not None]
        summary["standard_pass"] = bool(judged) and all(judged)
        summary["median_ratio_over_seeds"] = {name: check["median_ratio"] for name, check in seeds_verdict.items()}
    if float64:
        summary.update(float64_pass=float64["pass"], float64_max_loss_rel=float64["max_loss_relative_difference"],
                       float64_max_adapter_rel=float64["max_adapter_relative_difference"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
