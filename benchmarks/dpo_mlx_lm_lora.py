"""DPO with LoRA on MLX: twintune's MLX backend against mlx-lm-lora's DPO trainer, same pairs, same run.

    python -m benchmarks.dpo_mlx_lm_lora [--shape small|125m|tiny] [--pairs 64] [--batch 8] [--repeats 3] [--no-save]

Both train DPO (sigmoid loss, beta 0.1, AdamW lr 5e-4 constant, batch --batch pairs) with LoRA r=8,
scale 2 (alpha 16) on q_proj and v_proj, on the same random-weight mlx-lm llama model (same seed,
so the same weights; vocabulary 32000) and the same synthetic preference pairs tokenized with the
built-in tokenizer (prompt + answer + end-of-text; the loss on the answer and end-of-text on both):

  mlx_lm_lora  mlx-lm-lora's `train_dpo` (its compiled step; the reference is a second copy of
               the model, as its trainer takes it: `ref_model`), each iteration a batch of pairs
               sorted by length, chosen and rejected padded to one width
  twintune     `task: {name: preference, loss: dpo}` on the MLX backend (the reference is the same
               model with the LoRA switched off: no copy)

Each runs in its own process. mlx-lm-lora draws a random batch each iteration (with replacement),
so each contender's tokens/s is its median seconds per optimizer step over --repeats epochs of
steps (the first, with compilation, dropped) against the mean real tokens of a batch of pairs (both
rows, prompt + answer + end-of-text): the same pairs' mean on both sides. Peak memory is
`mx.get_peak_memory()` over the measured steps (the weights of both models included). Targets
(issue 29): tokens/s >= 1.5x, peak memory <= 0.6x. mlx-lm-lora's trainer calls
`mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])`, a key MLX's CPU build
lacks: the child gives it the machine's memory (the wired limit does nothing on a CPU).
Results: results/dpo_mlx_lm_lora_<shape>.json, with the machine's CPU flags and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import check_targets, machine, run_child, write_result
from benchmarks.compare_mlx import SHAPES, mlx_lm_model

LR, BETA, R, ALPHA, TARGETS = 5e-4, 0.1, 8, 16, ["q_proj", "v_proj"]


def _pairs(count: int) -> list[dict]:
    from twintune.data.preferences import synthetic_pairs

    return synthetic_pairs(count, seed=0)


def _tokenized(pairs: list[dict]) -> list[dict]:
    """Each pair as mlx-lm-lora's DPO dataset rows: chosen and rejected ids (prompt + answer + end-of-text)
    and where the answer starts, tokenized as twintune's preference task does."""
    from twintune.data.documents import eos_id
    from twintune.data.preferences import answer
    from twintune.formats.checkpoint import load_tokenizer
    from twintune.formats.tiny_model import builtin_model_dir

    tokenizer = load_tokenizer(builtin_model_dir("tiny-gpt-neo"))
    eos = eos_id(tokenizer)
    rows = []
    for pair in pairs:
        prompt = tokenizer.encode(pair["prompt"], add_special_tokens=False).ids
        ids = {key: prompt + tokenizer.encode(answer(pair["prompt"], pair[key]), add_special_tokens=False).ids + [eos]
               for key in ("chosen", "rejected")}
        rows.append({**ids, "chosen_prompt_length": len(prompt), "rejected_prompt_length": len(prompt)})
    return rows


def _model_directory(shape: str) -> Path:
    """The random llama model as an mlx-lm model directory, with the built-in tokenizer's files."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from twintune.formats.tiny_model import builtin_model_dir

    folder = Path(tempfile.mkdtemp(prefix="llama-"))
    model = mlx_lm_model(shape)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = {"model_type": "llama", "rms_norm_eps": 1e-5, "vocab_size": 32000, "tie_word_embeddings": False,
              "max_position_embeddings": 2048, **SHAPES[shape]}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (builtin_model_dir("tiny-gpt-neo") / name).exists():
            shutil.copy(builtin_model_dir("tiny-gpt-neo") / name, folder / name)
    return folder


def _twintune_step(shape: str, pairs: list[dict], batch: int):
    from twintune.recipe import load_recipe
    from twintune.train.build import prepare
    from twintune.train.step import train_step

    source = Path(tempfile.mkdtemp(prefix="pairs-")) / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in pairs + pairs[:2]))  # 2 more: the held-out splits' 1 each
    run = prepare(load_recipe("recipes/demo-dpo.yaml", [
        f"model={_model_directory(shape)}", f"data.source={source}", "data.validation_fraction=0.01",
        "data.test_fraction=0.01", f"task={{name: preference, loss: dpo, beta: {BETA}}}",
        "method=" + json.dumps({"name": "lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS}),
        f"train.batch_size={batch}", f"train.lr={LR}", "train.warmup_steps=0", "train.schedule=constant",
        "train.max_grad_norm=0", "train.epochs=1000", "train.weight_decay=0.0"]), "mlx")
    counter = iter(range(10**9))
    return lambda: train_step(run, next(counter))


def _mlx_lm_lora_steps(shape: str, rows: list[dict], batch: int, steps: int) -> list[float]:
    """Seconds of each of `steps` optimizer steps of mlx-lm-lora's DPO (one report a step)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    info = mx.device_info
    mx.device_info = lambda: {**info(), "max_recommended_working_set_size": os.sysconf("SC_PAGE_SIZE") *
                              os.sysconf("SC_PHYS_PAGES")}  # MLX's CPU build lacks the key; a CPU wires nothing
    model, reference = mlx_lm_model(shape), mlx_lm_model(shape)  # the same seed: the same weights
    model.freeze()
    reference.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": R, "scale": ALPHA / R, "dropout": 0.0,
                                                     "keys": [f"self_attn.{t}" for t in TARGETS]})

    class Clock(TrainingCallback):
        def __init__(self):
            self.marks = [time.perf_counter()]

        def on_train_loss_report(self, info):
            self.marks.append(time.perf_counter())

    clock = Clock()
    folder = tempfile.mkdtemp(prefix="mlx-lm-lora-")
    args = DPOTrainingArgs(batch_size=batch, iters=steps, val_batches=0, steps_per_report=1, steps_per_eval=10**9,
                           steps_per_save=10**9, adapter_file=folder + "/adapters.safetensors", beta=BETA,
                           loss_type="sigmoid", max_seq_length=2048)
    mx.reset_peak_memory()
    train_dpo(model, reference, optim.AdamW(learning_rate=LR, weight_decay=0.0), rows, args=args,
              training_callback=clock, loss_type="sigmoid")
    shutil.rmtree(folder, ignore_errors=True)
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])]


def child(kind: str, shape: str, count: int, batch: int, repeats: int) -> dict:
    import mlx.core as mx

    pairs = _pairs(count)
    rows = _tokenized(pairs)
    steps_per_epoch = count // batch
    tokens_per_step = batch * statistics.mean(len(r["chosen"]) + len(r["rejected"]) for r in rows)
    if kind == "mlx_lm_lora":
        times = _mlx_lm_lora_steps(shape, rows, batch, steps_per_epoch * (repeats + 1))[steps_per_epoch:]
    else:
        step = _twintune_step(shape, pairs, batch)
        for _ in range(steps_per_epoch):  # the warm-up epoch
            step()
        mx.reset_peak_memory()
        times = []
        for _ in range(steps_per_epoch * repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"kind": kind, "shape": shape, "pairs_per_step": batch, "tokens_per_step": tokens_per_step,
            "step_seconds": seconds, "measured_steps": len(times), "real_tokens_per_s": tokens_per_step / seconds,
            "peak_memory_mb": mx.get_peak_memory() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", choices=list(SHAPES))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.pairs, args.batch, args.repeats)))
        return
    load = os.getloadavg()
    rows = {kind: run_child("benchmarks.dpo_mlx_lm_lora", ["--child", kind, "--shape", args.shape, "--pairs",
                                                           str(args.pairs), "--batch", str(args.batch), "--repeats",
                                                           str(args.repeats)], timeout=7200)
            for kind in ("twintune", "mlx_lm_lora")}
    ours, theirs = rows["twintune"], rows["mlx_lm_lora"]
    ratios = {"tokens_per_s": ours["real_tokens_per_s"] / theirs["real_tokens_per_s"],
              "peak_memory": ours["peak_memory_mb"] / theirs["peak_memory_mb"]}
    print(f"DPO + LoRA r={R} on q,v, mlx-lm llama {args.shape} shape, batches of {args.batch} pairs, median step of "
          f"{ours['measured_steps']}; load average before: {load[0]:.2f}")
    print(f"{'':14}{'tokens/s':>12}{'step s':>10}{'peak MB':>12}")
    for kind, row in rows.items():
        print(f"{kind:14}{row['real_tokens_per_s']:12.1f}{row['step_seconds']:10.3f}{row['peak_memory_mb']:12.1f}")
    verdicts = check_targets(ratios, {"tokens_per_s": (">=", 1.5), "peak_memory": ("<=", 0.6)})
    if not args.no_save:
        write_result(f"dpo_mlx_lm_lora_{args.shape}", {"machine": machine(), "load_average_before": load,
                                                       "rows": rows, "ratios": ratios, "targets": verdicts})
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
