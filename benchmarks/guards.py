"""Guards against forgetting on the demo: accuracy and the general text's perplexity change, with and without each guard.

    python -m benchmarks.guards [--backends torch,mlx] [--steps N] [--no-save]

The demo recipe (LoRA on every linear layer of the built-in tiny GPT-Neo, 300 steps) with
`train.forgetting_eval: synthetic` (400 held-out synthetic sentences, one per row: the kind of text
the model was pre-trained on), trained once per row of the table:

  none          the recipe as it is
  replay 0.2    train.replay {source: synthetic, fraction: 0.2}: a fifth of each step's examples are
                general sentences (another stream than the held-out ones), the loss weighted 0.8 / 0.2
  ewc 1e3, 1e4  train.ewc {source: synthetic, weight: W, samples: 32}
  distill 1, 10 train.distill {source: synthetic, weight: W, temperature: 1, rows: 4}: KL to the model
                with LoRA switched off on 4 general sentences per step

Prints validation accuracy, the general text's perplexity before and after and its relative change,
and the training seconds; writes results/guards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from benchmarks.common import announce_machine, write_result

GUARDS = {
    "none": [],
    "replay 0.2": ["train.replay={source: synthetic, fraction: 0.2}"],
    "ewc 1e3": ["train.ewc={source: synthetic, weight: 1000.0, samples: 32}"],
    "ewc 1e4": ["train.ewc={source: synthetic, weight: 10000.0, samples: 32}"],
    "distill 1": ["train.distill={source: synthetic, weight: 1.0, temperature: 1.0, rows: 4}"],
    "distill 10": ["train.distill={source: synthetic, weight: 10.0, temperature: 1.0, rows: 4}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps (default: the recipe's 4 epochs)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    announce_machine()
    # The MLX rows run in this process: bind MLX's matrix products to torch's BLAS (the tests' setting;
    # twintune/backends/mlx/__init__.py) instead of MLX's slow bundled one. Accuracy and perplexity are
    # what this benchmark measures; the training seconds are for orientation only.
    os.environ.setdefault("TWINTUNE_MLX_BLAS", "torch")
    print(f"MLX BLAS: {os.environ['TWINTUNE_MLX_BLAS']}", flush=True)
    from twintune.recipe import load_recipe
    from twintune.train.loop import train

    rows = []
    for backend in args.backends.split(","):
        for guard, overrides in GUARDS.items():
            steps = [f"train.max_steps={args.steps}"] if args.steps else []
            recipe = load_recipe("recipes/demo-financial-sentiment.yaml",
                                 ["train.forgetting_eval=synthetic", *steps, *overrides])
            start = time.perf_counter()
            summary = train(recipe, backend, tempfile.mkdtemp(prefix="guards-"), progress=False)
            f = summary["forgetting"]
            rows.append({"backend": backend, "guard": guard, "val_accuracy": summary["val_accuracy"],
                         "perplexity_before": f["perplexity_before"], "perplexity_after": f["perplexity_after"],
                         "relative_change": f["relative_change"], "train_seconds": summary["train_seconds"],
                         "wall_seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'backend':<8}{'guard':<12}{'val acc':>9}{'ppl before':>12}{'ppl after':>12}{'change':>10}{'train s':>9}")
    for r in rows:
        print(f"{r['backend']:<8}{r['guard']:<12}{r['val_accuracy']:>9.3f}{r['perplexity_before']:>12.2f}"
              f"{r['perplexity_after']:>12.2f}{r['relative_change']:>+10.1%}{r['train_seconds']:>9.1f}")
    if not args.no_save:
        print(f"wrote {write_result('guards', {'rows': rows})}")


if __name__ == "__main__":
    main()
