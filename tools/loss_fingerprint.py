"""A fingerprint of training behaviour: the float64 per-step losses of the demo and of short runs
of every method, task and guard, hashed, on each backend.

A refactor that claims "behaviour unchanged" prints the same hashes before and after:

    python tools/loss_fingerprint.py                 # every case on both backends
    python tools/loss_fingerprint.py --only demo     # the whole float64 demo alone

Each line: case, backend, steps, the first and last loss, and sha256 of the losses' float64 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile

# The tests' settings: one thread, MLX's products on torch's BLAS (rounding depends on both).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TWINTUNE_MLX_BLAS", "torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

DEMO = "recipes/demo-financial-sentiment.yaml"
SHORT = ["train.max_steps=12", "train.eval_every=6", "data.synthetic_size=240", "dtype=float64"]
GUARDS = ["train.replay={source: synthetic, fraction: 0.25}", "train.distill={source: synthetic, weight: 0.5}",
          "train.ewc={source: synthetic, weight: 10.0, samples: 4}"]

CASES: dict[str, list[str]] = {
    "demo": ["dtype=float64"],
    "lora-dropout": SHORT + ["method.dropout=0.1"],
    "dora": SHORT + ["method={name: dora, r: 4, dropout: 0.1}"],
    "ia3": SHORT + ["method={name: ia3}"],
    "bitfit": SHORT + ["method={name: bitfit}"],
    "last_blocks": SHORT + ["method={name: last_blocks, n: 1}"],
    "full": SHORT + ["method={name: full}", "train.lr=1e-4"],
    "adapter": SHORT + ["method={name: adapter, dropout: 0.1}"],
    "prompt": SHORT + ["method={name: prompt, n: 4}"],
    "ptuning": SHORT + ["method={name: ptuning, n: 4}"],
    "prefix": SHORT + ["method={name: prefix, n: 4, projection: true}"],
    "loreft": SHORT + ["method={name: loreft, r: 2, dropout: 0.1}"],
    "head": SHORT + ["task.head=linear"],
    "head-none": SHORT + ["method={name: none}", "task.head=linear"],
    "guards": SHORT + GUARDS,
    "causal_lm": SHORT + ["task=causal_lm", "data.source=synthetic"],
    "instruction": SHORT + ["task=instruction", "data.source=synthetic"],
    "instruction-packed": SHORT + ["task={name: instruction, packing: true}", "data.source=synthetic"],
}


def fingerprint(case: str, backend: str) -> str:
    import twintune.backends.mlx  # noqa: F401  (binds MLX's BLAS before mlx is used)
    from twintune.recipe import load_recipe
    from twintune.train.loop import train

    recipe = load_recipe(DEMO, CASES[case])
    with tempfile.TemporaryDirectory() as out:
        summary = train(recipe, backend=backend, out_dir=out, progress=False)
    losses = np.array(summary["train_losses"], np.float64)
    digest = hashlib.sha256(losses.tobytes()).hexdigest()[:16]
    return f"{case:20s} {backend:5s} {len(losses):4d} {losses[0]:.12f} {losses[-1]:.12f} {digest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--backends", nargs="*", default=["torch", "mlx"])
    args = parser.parse_args()
    for case in args.only:
        for backend in args.backends:
            print(fingerprint(case, backend), flush=True)


if __name__ == "__main__":
    sys.exit(main())
