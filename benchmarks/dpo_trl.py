"""DPO with LoRA: twintune's torch backend against TRL's DPOTrainer + PEFT, same pairs, same run.

    python -m benchmarks.dpo_trl [--shape 125m|tiny] [--pairs 64] [--batch 8] [--repeats 3] [--no-save]

Both train DPO (sigmoid loss, beta 0.1, AdamW lr 5e-4 constant, clipping at 1.0, batch --batch
pairs) with LoRA r=8, alpha=16 on q_proj and v_proj, on the same synthetic preference pairs
(data/preferences.py: prompt, chosen, rejected; end-of-text after each answer on both sides), on
a random-weight GPT-Neo of the shape with the built-in tokenizer. The reference is the base with
the adapter switched off on both (TRL's default for a PEFT model; no copy); a third row,
twintune_precomputed, computes it once before training (task.precompute_reference). Each runs in its
own process: one warm-up epoch over the pairs, then --repeats epochs; tokens/s counts the real
tokens of both answers' rows (prompt + answer + end-of-text), peak memory is the process's peak
RSS over the measured epochs. Targets (issue 29): tokens/s >= 1.5x, peak RSS <= 0.7x TRL's.
Results: results/dpo_trl_<shape>.json, with the machine's CPU flags and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from benchmarks.common import check_targets, machine, peak_rss_mb, reset_peak_rss, run_child, write_result

LR, BETA, R, ALPHA, TARGETS = 5e-4, 0.1, 8, 16, ["q_proj", "v_proj"]


def _pairs(count: int) -> list[dict]:
    from twintune.data.preferences import synthetic_pairs

    return synthetic_pairs(count, seed=0)


def _real_tokens(pairs: list[dict]) -> int:
    from twintune.data.preferences import answer
    from twintune.formats.checkpoint import load_tokenizer
    from twintune.formats.tiny_model import builtin_model_dir

    tokenizer = load_tokenizer(builtin_model_dir("tiny-gpt-neo"))

    def length(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return sum(length(p["prompt"]) + length(answer(p["prompt"], p[k])) + 1 for p in pairs
               for k in ("chosen", "rejected"))


def _twintune_epoch(shape: str, pairs: list[dict], batch: int, precompute: bool = False):
    from benchmarks.compare_torch import model_dir
    from twintune.recipe import load_recipe
    from twintune.train.build import prepare
    from twintune.train.step import train_step

    source = os.path.join(tempfile.mkdtemp(prefix="pairs-"), "pairs.jsonl")
    with open(source, "w") as handle:
        handle.writelines(json.dumps(p) + "\n" for p in pairs + pairs[:2])  # 2 more: the held-out splits' 1 each
    run = prepare(load_recipe("recipes/demo-dpo.yaml", [
        f"model={model_dir(shape)}", f"data.source={source}", "data.validation_fraction=0.01",
        "data.test_fraction=0.01", f"task={{name: preference, loss: dpo, beta: {BETA}, precompute_reference: {str(precompute).lower()}}}",
        "method=" + json.dumps({"name": "lora", "r": R, "alpha": ALPHA, "target_modules": TARGETS}),
        f"train.batch_size={batch}", f"train.lr={LR}", "train.warmup_steps=0", "train.schedule=constant",
        "train.max_grad_norm=1.0", "train.epochs=1"]), "torch")

    def epoch():
        for step in range(run.order.steps_per_epoch):
            train_step(run, step)
    rows = run.splits["train"]
    return epoch, sum(len(e.ids) + len(e.rejected.ids) for e in rows), len(rows)


def _trl_epoch(shape: str, pairs: list[dict], batch: int):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from benchmarks.compare_torch import model_dir

    directory = model_dir(shape)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    steps = len(pairs) // batch
    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=batch, learning_rate=LR,
                       lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=steps, beta=BETA, max_length=None,
                       logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                       disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(directory)), args=config,
                         train_dataset=Dataset.from_list(pairs[:steps * batch]), processing_class=tokenizer,
                         peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"))
    return trainer.train, _real_tokens(pairs[:steps * batch]), steps * batch


def child(kind: str, shape: str, count: int, batch: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    pairs = _pairs(count)
    if kind == "trl":
        epoch, tokens, trained = _trl_epoch(shape, pairs, batch)
    else:  # twintune_precomputed: the reference's log-probabilities computed once, before (and cached)
        epoch, tokens, trained = _twintune_epoch(shape, pairs, batch, precompute=kind == "twintune_precomputed")
    start = time.perf_counter()
    epoch()
    warmup = time.perf_counter() - start
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"kind": kind, "shape": shape, "pairs": trained, "real_tokens": tokens, "epoch_seconds": seconds,
            "epoch_times": times, "warmup_epoch_seconds": warmup, "real_tokens_per_s": tokens / seconds,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="125m", choices=["125m", "tiny", "1.3b"])
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
    rows = {kind: run_child("benchmarks.dpo_trl", ["--child", kind, "--shape", args.shape, "--pairs", str(args.pairs),
                                                   "--batch", str(args.batch), "--repeats", str(args.repeats)],
                            mlx=False, timeout=7200)
            for kind in ("twintune", "twintune_precomputed", "trl")}
    ours, theirs = rows["twintune"], rows["trl"]
    ratios = {"tokens_per_s": ours["real_tokens_per_s"] / theirs["real_tokens_per_s"],
              "peak_rss": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
    print(f"DPO + LoRA r={R} on q,v, {args.shape} shape, {ours['pairs']} pairs in batches of {args.batch}, "
          f"median of {args.repeats} epochs; load average before: {load[0]:.2f}")
    print(f"{'':22}{'tokens/s':>12}{'epoch s':>10}{'peak RSS MB':>14}")
    for kind, row in rows.items():
        print(f"{kind:22}{row['real_tokens_per_s']:12.1f}{row['epoch_seconds']:10.2f}{row['peak_rss_mb']:14.1f}")
    precomputed = rows["twintune_precomputed"]["real_tokens_per_s"] / theirs["real_tokens_per_s"]
    print(f"with precompute_reference: tokens/s {precomputed:.2f}x TRL's default (no target; TRL can precompute too)")
    verdicts = check_targets(ratios, {"tokens_per_s": (">=", 1.5), "peak_rss": ("<=", 0.7)})
    if not args.no_save:
        write_result(f"dpo_trl_{args.shape}", {"machine": machine(), "load_average_before": load, "rows": rows,
                                                "ratios": ratios, "precomputed_tokens_per_s_ratio": precomputed,
                                                "targets": verdicts})
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
