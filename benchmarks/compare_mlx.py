"""The MLX backend against mlx-lm's own training (LoRA, DoRA or full), on the same mlx-lm model and data, same run.

    python -m benchmarks.compare_mlx [--method lora|dora|full] [--task classification|instruction [--packed]] [--quick]
                                     [--shape small|base|tiny] [--examples N] [--repeats R]
                                     [--dtype float32|bfloat16|float16] [--compile] [--no-save]

Both train the same method (AdamW lr 2e-4, batch 8) on the same tokenized financial-sentiment
examples, loss on the label-word token only, on the same random-weight mlx-lm llama model (same
seed, so the same weights), held in --dtype by both (the adapters in float32 by both):

  lora   r=8, scale 2 = alpha 16 / r, q_proj + v_proj; mlx-lm: linear_to_lora_layers
  dora   the same with DoRA; mlx-lm: linear_to_lora_layers(..., use_dora=True) (fine_tune_type dora)
  full   every parameter, embeddings, final norm and lm_head included; mlx-lm: model.unfreeze()
         (its `fine_tune_type: full` unfreezes the blocks only; here both sides train the same
         parameters, and each row records its count). float32 only: twintune trains base
         parameters in float32 and refuses half-precision bases for it.

  mlx_lm     mlx-lm's trainer (`mlx_lm.tuner.trainer.train`, its LoRALinear, its compiled step,
             its length-sorted batches padded to a multiple of 32 + 1, full-vocabulary logits at
             every position, masked to the completion)
  twintune   twintune's MLX backend wrapping the same mlx-lm model (MLXLMModel): length-grouped
             batches padded to their longest row, logits only at the label positions
  twintune_compiled  (with --compile) the same with its step compiled (train.compile: mx.compile)

With --task instruction (issue 15) the examples are instruction pairs instead (benchmarks/common.py
instruction_pairs: "Instruction: Finish the sentence. Input: <first half of a synthetic sentence>
Output:" and its second half as the completion, then end-of-text), the loss on the completion and
end-of-text on both sides (mlx-lm's `mask_prompt`: its (tokens, offset) rows; twintune's
`task: instruction` encoding). Every completion token needs the full-vocabulary logits here, so
the label-word advantage is gone; targets: tokens/s >= 1.3x, peak memory <= 0.8x. With --packed
as well, the pairs are packed (`task.packing`: whole examples fill rows of PACKED_LENGTH tokens, the
loss still on each completion; --examples then counts pairs and an epoch is all their rows), and
mlx-lm's trainer gets the same rows with their completion masks: its own `train` with an
`iterate_batches` giving (rows, mask) and a loss that is its `default_loss` with that mask in place
of the (offset, length) one (an offset cannot mark several completions in one row).

Each runs in its own process. Epoch times: mlx-lm's come from its own report callback, one
report per epoch (steady state: the first epoch, with compilation, is dropped; so is ours).
Tokens/s counts real (non-padding) tokens; peak memory is `mx.get_peak_memory()` over the run
(and the process's peak RSS, which includes MLX's cache and the Python objects, in the JSON).
Every ratio is ours / theirs; the targets (tokens/s >= 1.5x, peak memory <= 1.0x mlx-lm's) are
printed PASS/FAIL; the last line is one JSON object with the ratios. Results go to
results/compare_mlx_<shape>[_<method>][_quick][_<dtype>][_compile].json (lora keeps the old name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    PACKED_LENGTH, check_targets, gemm_peak_gflops, instruction_task, method_training_flops, peak_rss_mb,
    print_epoch_table, reset_peak_rss, run_child, target_tokens, write_instruction_jsonl, write_result,
)

LORA = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "lr": 2e-4, "batch": 8}
METHODS = ("lora", "dora", "full")
TARGETS = {"tokens_per_s_ratio_vs_mlx_lm": (">=", 1.5), "peak_memory_ratio_vs_mlx_lm": ("<=", 1.0)}
INSTRUCTION_TARGETS = {"tokens_per_s_ratio_vs_mlx_lm": (">=", 1.3), "peak_memory_ratio_vs_mlx_lm": ("<=", 0.8)}
SHAPES = {  # llama-family shapes; vocabulary 32000 as Llama 2 / Mistral
    "small": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376, num_attention_heads=8),
    # GPT-Neo 125M's width and depth in the llama family (issue 15's "125M shape"; 32000 words)
    "125m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12),
    "base": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816, num_attention_heads=16),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4),  # smoke tests
}


def mlx_lm_model(shape: str, dtype: str = "float32"):
    """A random-weight mlx-lm llama model; the same seed gives the same weights in every process."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, vocab_size=32000, tie_word_embeddings=False,
                           **SHAPES[shape])
    model = llama.Model(args)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def train_examples(n: int, task: str = "classification", packed: bool = False):
    """n tokenized training examples of the built-in synthetic set (prompt, then the label word), or with
    task "instruction" n instruction pairs (prompt, completion, end-of-text) as the instruction task encodes
    them; `packed`: the rows the instruction task packs n pairs into."""
    if task == "instruction":
        return instruction_examples(n, packed)
    from twintune.data.batching import Encoder, Prompt
    from twintune.data.sources import load_examples
    from twintune.formats.checkpoint import load_tokenizer
    from twintune.formats.tiny_model import builtin_model_dir
    from twintune.recipe import load_recipe

    recipe = load_recipe("recipes/demo-financial-sentiment.yaml")
    examples = load_examples("synthetic", synthetic_size=n, seed=recipe.seed, labels=tuple(recipe.prompt.labels))
    encoder = Encoder(load_tokenizer(builtin_model_dir("tiny-gpt-neo")),
                      Prompt(recipe.prompt.template, recipe.prompt.labels), max_length=recipe.data.max_length)
    return encoder.encode_all(examples[:n])


def instruction_examples(n: int, packed: bool = False):
    """instruction_pairs through twintune's instruction task (template "{prompt}", mask_prompt), all as training rows."""
    from twintune.recipe import load_recipe
    from twintune.formats.checkpoint import load_tokenizer
    from twintune.formats.tiny_model import builtin_model_dir

    folder = Path(tempfile.mkdtemp(prefix="instructions-"))
    source = write_instruction_jsonl(folder / "pairs.jsonl", int(n / 0.8) + 3)  # the demo's 0.8 train share
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", instruction_task(source, packed))
    tokenizer = load_tokenizer(builtin_model_dir("tiny-gpt-neo"))
    rows = recipe.task.splits(recipe.data, recipe.seed, tokenizer, recipe.data.max_length)["train"]
    return rows if packed else rows[:n]


def child(kind: str, shape: str, examples: int, repeats: int, dtype: str, method: str = "lora",
          task: str = "classification", packed: bool = False) -> dict:
    import mlx.core as mx

    from twintune.backends.mlx.mlx_lm_model import MLXLMModel

    encoded = train_examples(examples, task, packed)
    steps = len(encoded) // LORA["batch"]
    encoded = encoded[: steps * LORA["batch"]]  # mlx-lm drops a last partial batch: train on the same set
    real_tokens = sum(len(e.ids) for e in encoded)
    model = mlx_lm_model(shape, dtype)
    mx.reset_peak_memory()
    reset_peak_rss()
    if kind == "mlx_lm":
        epoch_times, trainable = _mlx_lm_epochs(model, encoded, steps, repeats + 1, dtype, method, packed)
    else:
        epoch_times, trainable = _twintune_epochs(model, encoded, steps, repeats + 1, dtype,
                                                  compile=kind == "twintune_compiled", method=method)
    times = epoch_times[1:]
    seconds = statistics.median(times)
    peak_mb = mx.get_peak_memory() / 2**20
    rss_peak_mb = peak_rss_mb()
    args = SHAPES[shape]
    del model
    from twintune.backends.mlx.backend import MLXBackend

    fresh = MLXBackend.from_model(MLXLMModel(mlx_lm_model(shape)))  # float32: the plan only names what trains
    spec = fresh.spec
    flops = method_training_flops(_plan(fresh, method, "float32"), spec.linear_layers(), args["hidden_size"],
                                  args["num_hidden_layers"], spec.vocab_size, [len(e.ids) for e in encoded],
                                  target_tokens(encoded), output_weight="lm_head.weight")
    del fresh
    peak_gflops = gemm_peak_gflops("mlx", dtype=dtype)
    return {"kind": kind, "method": method, "task": task, "packed": packed, "trainable_parameters": trainable, "shape": shape, "dtype": dtype,
            "examples": len(encoded), "steps": steps, "real_tokens": real_tokens,
            "epoch_seconds": seconds, "epoch_times": times, "warmup_epoch_seconds": epoch_times[0],
            "real_tokens_per_s": real_tokens / seconds, "peak_memory_mb": peak_mb, "peak_rss_mb": rss_peak_mb,
            "useful_gflop_per_epoch": flops / 1e9, "achieved_gflops": flops / seconds / 1e9,
            "gemm_peak_gflops": peak_gflops, "mfu": flops / seconds / 1e9 / peak_gflops}


def _plan(backend, method: str, dtype: str):
    """The method's plan on the backend's mlx-lm model (the same settings as mlx-lm's side)."""
    from twintune.methods import BaseModel, DoRA, Full, LoRA

    base = BaseModel(backend.spec, backend.base_weights(), dtype=dtype)
    if method == "full":
        return Full().plan(base, seed=0)
    cls = DoRA if method == "dora" else LoRA
    return cls(r=LORA["r"], alpha=LORA["alpha"], target_modules=tuple(LORA["targets"])).plan(base, seed=0)


def _twintune_epochs(model, encoded, steps: int, epochs: int, dtype: str, compile: bool = False,
                     method: str = "lora") -> tuple[list[float], int]:
    from twintune.backends.base import AdamW
    from twintune.backends.mlx.backend import MLXBackend
    from twintune.backends.mlx.mlx_lm_model import MLXLMModel
    from twintune.data.batching import TrainOrder

    backend = MLXBackend.from_model(MLXLMModel(model), dtype=dtype)
    plan = _plan(backend, method, dtype)
    trainable = plan.trainable_parameters()
    backend.apply_method(plan)
    del plan
    backend.set_optimizer(AdamW((0.9, 0.999), 1e-8, 0.0))
    if compile:
        backend.enable_compile()
    order = TrainOrder(encoded, LORA["batch"], 1, seed=0, group_by_length=True)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for step in range(steps):
            (batch,) = order.step_batches(step)
            backend.forward_backward(batch, 1.0 / batch.n_targets)
            backend.optimizer_step(LORA["lr"], 0.0)
        times.append(time.perf_counter() - start)
    return times, trainable


def _mlx_lm_epochs(model, encoded, steps: int, epochs: int, dtype: str,
                   method: str = "lora", packed: bool = False) -> tuple[list[float], int]:  # the model is in dtype
    import shutil

    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    if method == "full":
        model.unfreeze()  # everything, as twintune's full (mlx_lm.lora's "full" unfreezes only the blocks)
    else:
        linear_to_lora_layers(model, len(model.layers), {
            "rank": LORA["r"], "scale": LORA["alpha"] / LORA["r"], "dropout": 0.0,
            "keys": [f"self_attn.{t}" for t in LORA["targets"]]}, use_dora=method == "dora")
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    # (tokens, offset): mlx-lm's loss covers the tokens from the offset on, here the label word
    dataset = [(e.ids.tolist(), e.prompt_len) for e in encoded]
    loops = {}
    if packed:  # rows with several completions each: the mask comes with the row
        dataset = [(e.ids, e.target_mask) for e in encoded]
        loops = {"loss": _masked_loss, "iterate_batches": _masked_batches}

    class EpochClock(TrainingCallback):
        def __init__(self):
            self.marks = [time.perf_counter()]

        def on_train_loss_report(self, info):
            self.marks.append(time.perf_counter())

    clock = EpochClock()
    folder = tempfile.mkdtemp(prefix="mlx-lm-")  # mlx-lm saves the trained weights at the end (all of them for full)
    args = TrainingArgs(batch_size=LORA["batch"], iters=steps * epochs, val_batches=0, steps_per_report=steps,
                        steps_per_eval=10**9, steps_per_save=10**9, adapter_file=folder + "/adapters.safetensors")
    try:
        train(model, optim.AdamW(learning_rate=LORA["lr"], weight_decay=0.0), dataset, args=args,
              training_callback=clock, **loops)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])], trainable


def _masked_loss(model, batch, mask):
    """mlx-lm's default_loss with the targets' mask given instead of built from (offset, length)."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(batch[:, :-1])
    ce = nn.losses.cross_entropy(logits, batch[:, 1:]) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def _masked_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
    """mlx-lm's iterate_batches for (ids, target mask) rows: length-sorted batches in a random order,
    padded to their longest row; yields (rows, mask of the next-token targets)."""
    import mlx.core as mx
    import numpy as np

    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for b in rng.permutation(len(batches)):
            rows = [dataset[i] for i in batches[b]]
            width = max(len(ids) for ids, _ in rows)
            ids = np.zeros((len(rows), width), np.int32)
            mask = np.zeros((len(rows), width), bool)
            for j, (row_ids, row_mask) in enumerate(rows):
                ids[j, :len(row_ids)], mask[j, :len(row_ids)] = row_ids, row_mask
            yield mx.array(ids), mx.array(mask[:, 1:])  # target t is predicted at t - 1
        if not loop:
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=METHODS, help="the method both sides train")
    parser.add_argument("--task", default="classification", choices=["classification", "instruction"],
                        help="label words (default) or instruction pairs with multi-token completions")
    parser.add_argument("--packed", action="store_true",
                        help=f"with --task instruction: the pairs packed into rows of {PACKED_LENGTH} tokens, on both sides")
    parser.add_argument("--quick", action="store_true", help="small shape, 64 examples, 3 repeats: under 5 minutes")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="also time twintune with its step compiled")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results/*.json")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.quick:
        args.shape, args.examples, args.repeats = "small", 64, 3
    if args.method == "full" and args.dtype != "float32":
        parser.error("--method full trains the base's own parameters, which twintune keeps in float32: "
                     "use --dtype float32")
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.examples, args.repeats, args.dtype, args.method, args.task,
                               args.packed)))
        return
    if args.packed and args.task != "instruction":
        parser.error("--packed packs instruction pairs; add --task instruction")

    rows = {}
    for kind in ("twintune", "mlx_lm") + (("twintune_compiled",) if args.compile else ()):
        rows[kind] = run_child("benchmarks.compare_mlx", ["--child", kind, "--shape", args.shape,
                                                          "--examples", str(args.examples),
                                                          "--repeats", str(args.repeats), "--dtype", args.dtype,
                                                          "--method", args.method, "--task", args.task,
                                                          *(["--packed"] if args.packed else [])])
        print(json.dumps(rows[kind]), flush=True)
    ours, theirs = rows["twintune"], rows["mlx_lm"]
    ratios = {
        "tokens_per_s_ratio_vs_mlx_lm": ours["real_tokens_per_s"] / theirs["real_tokens_per_s"],
        "peak_memory_ratio_vs_mlx_lm": ours["peak_memory_mb"] / theirs["peak_memory_mb"],
        "peak_rss_ratio_vs_mlx_lm": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
        "epoch_time_ratio_vs_mlx_lm": ours["epoch_seconds"] / theirs["epoch_seconds"],
    }
    if args.compile:
        ratios["compiled_epoch_time_ratio_vs_eager"] = rows["twintune_compiled"]["epoch_seconds"] / ours["epoch_seconds"]
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    print(f"mlx-lm llama {args.shape} shape (vocabulary 32000, {args.dtype}), task {args.task}"
          f"{' (packed)' if args.packed else ''}, method {args.method} "
          f"({ours['trainable_parameters']:,} trainable), {ours['examples']} examples "
          f"({ours['real_tokens']} real tokens), batch {LORA['batch']}, median of {args.repeats} epochs after one warm-up")
    print_epoch_table(rows, "peak_memory_mb", "mx peak MB")
    counts = {kind: row["trainable_parameters"] for kind, row in rows.items()}
    if len(set(counts.values())) > 1:
        print(f"WARNING: the contenders train different numbers of parameters: {counts}")
    targets = check_targets(ratios, INSTRUCTION_TARGETS if args.task == "instruction" else TARGETS)
    suffix = ("" if args.method == "lora" else f"_{args.method}")  # lora keeps the old name
    suffix += "_instruction" if args.task == "instruction" else ""
    suffix += "_packed" if args.packed else ""
    suffix += ("_quick" if args.quick else "") + ("" if args.dtype == "float32" else f"_{args.dtype}")
    suffix += "_compile" if args.compile else ""
    if not args.no_save:
        path = write_result(f"compare_mlx_{args.shape}{suffix}", {"method": args.method, "task": args.task,
                                                                   "packed": args.packed, "rows": rows,
                                                                   "ratios": ratios, "targets": targets})
        print(f"wrote {path}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
