"""PPO with LoRA: twintune's torch backend against TRL's PPOTrainer, seconds per rollout-and-update.

    python -m benchmarks.ppo_trl [--shape 125m|tiny] [--prompts 8] [--updates 4] [--trl-python PATH] [--no-save]

TRL removed its PPOTrainer in 1.0; its last one is trl 0.29.1's `trl.experimental.ppo`, which
cannot be installed beside the dev extra's trl>=1.16. TRL's side therefore runs in a second
virtualenv that sees this one's packages and adds only that TRL:

    python -m venv --system-site-packages .venv-trl029 && .venv-trl029/bin/pip install --no-deps trl==0.29.1
    python -m benchmarks.ppo_trl --trl-python .venv-trl029/bin/python

Both run PPO on a random-weight GPT-Neo of the shape with the built-in tokenizer, the same
synthetic openings as prompts (--prompts a rollout), completions of exactly --tokens tokens
(TRL: response_length, no stop token; twintune: max_new_tokens, and a random model almost never
samples end-of-text), temperature 0.7, 4 PPO epochs of one minibatch (one optimizer step each),
LoRA r=8, alpha 16 on q_proj and v_proj, kl_coef 0.05, AdamW lr 1e-5 constant. The reward model
is the same random model with a one-output head on both sides (TRL: AutoModelForSequenceClassification
of the model's directory; twintune: a reward run of one step on it). The value model is where each
puts it: TRL trains a second whole model (AutoModelForSequenceClassification, every parameter);
twintune a value head on the policy. Each runs in its own process; a row is the median seconds of
--updates rollouts-and-updates after one warm-up (TRL: between its `on_step_end` callbacks, one per
update; twintune: 4 optimizer steps, the first of which samples), and the peak RSS. No target
(issue 29: "reported").
Results: results/ppo_trl_<shape>.json, with the machine's CPU flags and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import fast_blas_env, machine, peak_rss_mb, reset_peak_rss, run_child, write_result

LR, R, ALPHA, TARGETS, EPOCHS, KL, TEMPERATURE = 1e-5, 8, 16, ["q_proj", "v_proj"], 4, 0.05, 0.7


def _prompts(count: int) -> list[str]:
    from twintune.data.preferences import synthetic_prompts

    return [row["prompt"] for row in synthetic_prompts(count, seed=0)]


def _twintune_updates(shape: str, prompts: list[str], tokens: int, updates: int) -> list[float]:
    from benchmarks.compare_torch import model_dir
    from twintune.recipe import load_recipe
    from twintune.train.build import prepare
    from twintune.train.loop import train
    from twintune.train.step import train_step

    folder = Path(tempfile.mkdtemp(prefix="ppo-"))
    lora = "method=" + json.dumps({"name": "lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS})
    common = [f"model={model_dir(shape)}", lora, "train.warmup_steps=0", "train.schedule=constant",
              "train.weight_decay=0.0", "train.max_grad_norm=0", f"train.lr={LR}", "data.max_length=64"]
    train(load_recipe("recipes/demo-reward-model.yaml", [*common, "train.max_steps=1", "train.batch_size=2",
                                                         "data.synthetic_size=40"]),
          "torch", folder / "reward", progress=False)
    source = folder / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts * (updates + 2) + prompts[:2]))
    run = prepare(load_recipe("recipes/demo-ppo.yaml", [
        *common, f"data.source={source}", "data.validation_fraction=0.01", "data.test_fraction=0.01",
        f"task={{name: ppo, reward_model: {folder / 'reward'}, max_new_tokens: {tokens}, temperature: {TEMPERATURE}, "
        f"kl_coef: {KL}, num_ppo_epochs: {EPOCHS}}}", f"train.batch_size={len(prompts)}",
        f"train.max_steps={EPOCHS * (updates + 1)}"]), "torch")
    times = []
    for update in range(updates + 1):
        start = time.perf_counter()
        for step in range(update * EPOCHS, (update + 1) * EPOCHS):
            train_step(run, step)
        times.append(time.perf_counter() - start)
        if update == 0:
            reset_peak_rss()
    return times[1:]


def _trl_updates(shape: str, prompts: list[str], tokens: int, updates: int) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks.compare_torch import model_dir

    torch.manual_seed(0)
    directory = str(model_dir(shape))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{directory}/tokenizer.json", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    dataset = Dataset.from_list([{"input_ids": tokenizer(p)["input_ids"]} for p in prompts * (updates + 1)])

    def scorer():
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    class Clock(TrainerCallback):
        marks = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            if len(self.marks) == 1:
                reset_peak_rss()

    config = PPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), per_device_train_batch_size=len(prompts),
                       gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=EPOCHS,
                       total_episodes=len(prompts) * (updates + 1), response_length=tokens, temperature=TEMPERATURE,
                       kl_coef=KL, learning_rate=LR, lr_scheduler_type="constant", stop_token=None,
                       num_sample_generations=0, save_strategy="no", report_to=[], use_cpu=True, logging_steps=10**6,
                       local_rollout_forward_batch_size=len(prompts), missing_eos_penalty=None, disable_tqdm=True)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(directory),
                         ref_model=None, reward_model=scorer(), value_model=scorer(), train_dataset=dataset,
                         peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"))
    clock = Clock()
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    marks = [start, *clock.marks]
    return [b - a for a, b in zip(marks, marks[1:])][1:]


def child(kind: str, shape: str, prompts: int, tokens: int, updates: int) -> dict:
    texts = _prompts(prompts)
    times = (_trl_updates if kind == "trl" else _twintune_updates)(shape, texts, tokens, updates)
    return {"kind": kind, "shape": shape, "prompts": prompts, "completion_tokens": tokens, "update_times": times,
            "update_seconds": statistics.median(times), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="125m", choices=["125m", "tiny"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--trl-python", default=os.environ.get("TWINTUNE_TRL_PPO_PYTHON", ".venv-trl029/bin/python"))
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    settings = ["--shape", args.shape, "--prompts", str(args.prompts), "--tokens", str(args.tokens), "--updates",
                str(args.updates)]
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.prompts, args.tokens, args.updates)))
        return
    if not Path(args.trl_python).exists():
        raise SystemExit(f"TRL's PPO needs trl 0.29.1 in a second virtualenv ({args.trl_python} is missing); make it "
                         "as this module's docstring says.")
    load = os.getloadavg()
    rows = {"twintune": run_child("benchmarks.ppo_trl", ["--child", "twintune", *settings], mlx=False, timeout=7200)}
    out = subprocess.run([args.trl_python, "-m", "benchmarks.ppo_trl", "--child", "trl", *settings],
                         env=fast_blas_env(preload=False), capture_output=True, text=True, timeout=7200,
                         cwd=Path(__file__).parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"TRL's side failed:\n{out.stderr[-3000:]}")
    rows["trl"] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = rows["twintune"]["update_seconds"] / rows["trl"]["update_seconds"]
    print(f"PPO + LoRA r={R} on q,v, {args.shape} shape, rollouts of {args.prompts} prompts x {args.tokens} tokens, "
          f"{EPOCHS} PPO epochs, median of {args.updates} updates; load average before: {load[0]:.2f}")
    print(f"{'':12}{'s/update':>10}{'peak RSS MB':>14}")
    for kind, row in rows.items():
        print(f"{kind:12}{row['update_seconds']:10.2f}{row['peak_rss_mb']:14.1f}")
    print(f"seconds per rollout-and-update: {ratio:.2f}x TRL's (lower is faster); peak RSS "
          f"{rows['twintune']['peak_rss_mb'] / rows['trl']['peak_rss_mb']:.2f}x")
    if not args.no_save:
        write_result(f"ppo_trl_{args.shape}", {"machine": machine(), "load_average_before": load, "rows": rows,
                                                "update_seconds_ratio": ratio, "trl_version": "0.29.1"})
    print(json.dumps({"update_seconds_ratio": ratio}))


if __name__ == "__main__":
    main()
