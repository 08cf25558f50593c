"""`twintune ...`: the command line. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from twintune.errors import TwintuneError, TwintuneWarning
from twintune.train.interrupt import Interrupted


def build_parser() -> argparse.ArgumentParser:
    from twintune.compare import DEFAULT_METHODS, ENTRIES  # the entries' names, from the methods' registry

    parser = argparse.ArgumentParser(prog="twintune", description="Fine-tune GPT-Neo with PEFT methods on MLX or PyTorch.")
    parser.add_argument("--version", action="version", version=f"twintune {_version()}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a recipe")
    train.add_argument("recipe", nargs="?", default=None,
                       help="a YAML recipe, e.g. recipes/demo-financial-sentiment.yaml (with --resume: the run's own)")
    train.add_argument("--backend", default=None, help="auto (default: the recipe's), mlx or torch")
    train.add_argument("--out", default=None, help="run directory (default: runs/NAME-BACKEND-TIME)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run --out holds (it stays whole until the new run is written)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set train.lr=1e-3 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--resume", default=None, metavar="DIR",
                       help="continue from a run directory's newest checkpoint (or from one checkpoint directory)")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train on N local processes through the backend's launcher (torchrun or mlx.launch); "
                            "train.batch_size stays the global batch")

    evaluation = verbs.add_parser("eval", help="evaluate a run directory (or a recipe's untrained start) on a split")
    evaluation.add_argument("target", help="a run directory from `twintune train`, or a recipe file")
    evaluation.add_argument("--split", default="validation", help="validation (default), test or train")
    evaluation.add_argument("--backend", default=None, help="mlx or torch (default: the backend that trained the run)")
    evaluation.add_argument("--json", action="store_true", help="print the report as JSON")
    evaluation.add_argument("--shots", type=int, default=None,
                            help="K training sentences of each class before every sentence (0: zero-shot)")
    evaluation.add_argument("--retrieve", action="store_true",
                            help="with --shots: the K of each class nearest to each sentence (by the model's own "
                                 "features), reported beside random shots")

    prediction = verbs.add_parser("predict", help="label and probabilities for texts, from a run directory")
    prediction.add_argument("target", help="a run directory from `twintune train`")
    prediction.add_argument("texts", nargs="+", help="one or more sentences")
    prediction.add_argument("--backend", default=None, help="mlx or torch (default: the backend that trained the run)")

    generating = verbs.add_parser("generate", help="continue a prompt with a run's model (or a base model)")
    generating.add_argument("target", help="a run directory from `twintune train`, or a model (directory, "
                                           "builtin:tiny-gpt-neo, hub id)")
    generating.add_argument("prompt", help="the text to continue")
    generating.add_argument("--max-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    generating.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    generating.add_argument("--chat", action="store_true",
                            help="the prompt is a user's message: render it with the run's chat template")
    generating.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    generating.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens whose "
                                                                      "probability reaches this (default 1: all)")
    generating.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    generating.add_argument("--backend", default="auto",
                            help="mlx or torch (default: the backend that trained the run; for a model, auto)")

    merging = verbs.add_parser("merge", help="fold a run's trained values into the base; write a Hugging Face checkpoint")
    merging.add_argument("target", help="a run directory from `twintune train`")
    merging.add_argument("--out", required=True, help="directory to write (must be new or empty)")

    exporting = verbs.add_parser("export", help="write a run's adapter in another tool's format")
    exporting.add_argument("target", help="a run directory from `twintune train`")
    exporting.add_argument("--format", required=True, choices=["peft", "mlx-lm", "gguf", "gguf-lora"],
                           help="peft, mlx-lm, gguf (the merged model as one llama.cpp file; llama-family models) or "
                                "gguf-lora (a LoRA adapter as llama.cpp's LoRA file)")
    exporting.add_argument("--out", required=True, help="directory to write (must be new or empty); gguf: the file")
    exporting.add_argument("--quantize", default="f16", choices=["f16", "q8_0", "f32"],
                           help="gguf: the weights' type (default f16)")

    estimating = verbs.add_parser("estimate", help="predicted peak memory of a recipe's training, before running it")
    estimating.add_argument("recipe", help="a YAML recipe")
    estimating.add_argument("--tokens", type=int, default=None,
                            help="tokens per sequence (default: the recipe's data.max_length, the worst case)")
    estimating.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a recipe value (repeatable)")
    estimating.add_argument("--backend", default=None, help="auto (default: the recipe's), mlx or torch")
    estimating.add_argument("--json", action="store_true", help="print the estimate as JSON")

    comparing = verbs.add_parser("compare", help="train every method on one recipe's data; a table and a plot")
    comparing.add_argument("recipe", help="a YAML recipe: its data, prompt and training budget are shared by all")
    comparing.add_argument("--methods", default=None,
                           help=f"comma-separated entries (default: {', '.join(DEFAULT_METHODS)}; also: "
                                f"{', '.join(sorted(set(ENTRIES) - set(DEFAULT_METHODS)))})")
    comparing.add_argument("--backend", default=None, help="auto (default: the recipe's), mlx or torch")
    comparing.add_argument("--seeds", type=int, default=1, help="seeds per entry (default 1): mean and std")
    comparing.add_argument("--shots", type=int, default=4, help="the few-shot entry's sentences of each class (default 4)")
    comparing.add_argument("--out", default=None, help="directory (default: runs/compare-NAME-BACKEND-TIME)")
    comparing.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="a recipe value for every entry (train.epochs=2), or for one entry (lora.r=16, "
                                "prompt.train.lr=0.1); repeatable")
    comparing.add_argument("--resume", action="store_true", help="run only the rows --out does not hold finished")
    comparing.add_argument("--no-progress", action="store_true", help="no progress bars")

    diagnosing = verbs.add_parser("doctor", help="what went wrong in a run, with its evidence and what to change")
    diagnosing.add_argument("run", help="a run directory from `twintune train`")
    diagnosing.add_argument("--json", action="store_true", help="print the findings as JSON")

    verbs.add_parser("methods", help="every fine-tuning method with its recipe keys and defaults")

    tiny = verbs.add_parser("make-tiny-model", help="write a tiny random GPT-Neo + tokenizer (offline)")
    tiny.add_argument("out", help="directory to write")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `twintune` console script.

    Usage (tests/test_cli.py runs each verb):
        $ twintune train recipes/demo-financial-sentiment.yaml --backend mlx --out runs/demo
        $ twintune eval runs/demo --split test
        $ twintune predict runs/demo "Operating profit rose to EUR 13.1 mn ."
        $ twintune generate runs/demo "Operating profit" --max-tokens 20
        $ twintune merge runs/demo --out models/demo-merged
        $ twintune estimate recipes/gpt-neo-1.3b-financial-sentiment-qlora.yaml
        $ twintune compare recipes/demo-financial-sentiment.yaml --methods lora,bitfit,zero-shot --seeds 3
        $ twintune doctor runs/demo
    """
    args = build_parser().parse_args(argv)
    show_warning = warnings.showwarning

    def one_line(message, category, *rest, **options):  # ours as one line; other packages' as they print them
        if issubclass(category, TwintuneWarning):
            print(f"twintune: warning: {message}", file=sys.stderr)
        else:
            show_warning(message, category, *rest, **options)

    warnings.showwarning = one_line
    try:
        if args.verb == "train":
            from twintune.train.distributed import restore_stop_signals
            from twintune.train.loop import recipe_to_train, train

            if "RANK" in os.environ or "MLX_RANK" in os.environ:  # one of several processes `--nproc` started
                restore_stop_signals()
            recipe = recipe_to_train(args.recipe, args.overrides, args.resume)
            if args.nproc is not None:
                return _launch(recipe, args, argv if argv is not None else sys.argv[1:])
            summary = train(recipe, backend=args.backend, out_dir=args.out, progress=not args.no_progress,
                            resume=args.resume, overwrite=args.overwrite)
            if summary.get("rank", 0) != 0:  # another process of a multi-process run: rank 0 reports
                return 0
            shown = {k: summary[k] for k in ("backend", "method", "steps", "final_train_loss", *recipe.task.metrics,
                                             "train_seconds", "peak_memory_mb", "out_dir") if k in summary}
            print(json.dumps(shown, indent=2))
        elif args.verb == "eval":
            from twintune.train.runs import evaluate_split

            evaluation = evaluate_split(args.target, args.split, args.backend, shots=args.shots, retrieve=args.retrieve)
            print(json.dumps(evaluation.to_dict(), indent=2) if args.json else evaluation.text())
        elif args.verb == "predict":
            from twintune.train.runs import predict_texts

            for row in predict_texts(args.target, args.texts, args.backend):
                scores = "  ".join(f"{label} {p:.3f}" for label, p in row["probabilities"].items())
                print(f"{row['label']:<10} [{scores}]  {row['text']}")
        elif args.verb == "generate":
            from twintune.api import generate

            out = generate(args.target, args.prompt, backend=args.backend, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=args.chat,
                           system=args.system)
            print(out.text if args.chat else args.prompt + out.text)
            print(f"[{len(out.token_ids)} tokens, stopped: {out.finish_reason}, "
                  f"{len(out.token_ids) / max(out.seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
        elif args.verb == "merge":
            from twintune.train.runs import merge_run

            print(merge_run(args.target, args.out))
        elif args.verb == "export":
            from twintune.train.runs import export_run_adapter

            print(export_run_adapter(args.target, args.format, args.out, args.quantize))
        elif args.verb == "estimate":
            from twintune.memory import estimate_recipe

            rows, note = estimate_recipe(args.recipe, args.overrides, args.tokens, args.backend)
            if args.json:
                print(json.dumps({name: round(mb, 1) for name, mb in rows}))
            else:
                print(note)
                for name, mb in rows:
                    print(f"  {name:22s} {mb:10.1f} MB")
        elif args.verb == "compare":
            from twintune.compare import DEFAULT_METHODS, compare

            result = compare(args.recipe, args.methods or ",".join(DEFAULT_METHODS), args.backend, args.seeds, args.out,
                             args.overrides, args.resume, args.shots, progress=not args.no_progress)
            print((Path(result["out_dir"]) / "compare.md").read_text())
            print(f"wrote {result['out_dir']}/compare.json, compare.md and compare.png")
        elif args.verb == "doctor":
            from twintune.doctor import doctor, doctor_text

            report = doctor(args.run)
            print(json.dumps(report, indent=2) if args.json else doctor_text(report))
        elif args.verb == "methods":
            from twintune.methods import describe_methods

            print(describe_methods())
        elif args.verb == "make-tiny-model":
            from twintune.formats.tiny_model import write_tiny_model

            print(write_tiny_model(args.out, seed=args.seed))
        return 0
    except Interrupted as e:  # stopped by a signal, its checkpoint written
        if str(e):
            print(f"twintune: {e}", file=sys.stderr)
        return e.exit_code
    except TwintuneError as e:
        print(f"twintune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("twintune: interrupted; files already written are complete (they are written atomically).", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`twintune eval RUN | head -1`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit stays quiet
        return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("twintune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _launch(recipe, args, argv: list[str]) -> int:
    """`twintune train --nproc N ...`: the same command on N processes, started by the backend's launcher."""
    from twintune.backends import resolve_backend_name
    from twintune.train.distributed import launch

    backend = resolve_backend_name(args.backend or recipe.backend)
    rest, skip = [], False
    for arg in argv:  # the same arguments without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return launch(backend, args.nproc, rest)


if __name__ == "__main__":
    sys.exit(main())
