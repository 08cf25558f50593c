"""Bad input, each answered by the CLI with one line naming the problem and a non-zero exit.

No traceback, and nothing already written is lost: every case runs beside an existing run
directory and a file that must survive untouched.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from model_helpers import write_tiny_llama


DEMO = "recipes/demo-financial-sentiment.yaml"
QUICK = ["--set", "train.max_steps=2", "--set", "data.synthetic_size=60", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the cases point at: a finished run, broken models, bad data files."""
    root = tmp_path_factory.mktemp("catalogue")
    run = root / "run"
    subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out", str(run),
                    "--set", "train.save_every=1", *QUICK], check=True, capture_output=True)
    from twintune.formats.tiny_model import builtin_model_dir, write_tiny_model

    corrupt_model = root / "corrupt-model"
    shutil.copytree(builtin_model_dir("tiny-gpt-neo"), corrupt_model)
    weights = (corrupt_model / "model.safetensors").read_bytes()
    (corrupt_model / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    other = write_tiny_model(root / "other-model", hidden_size=32, intermediate_size=128)

    # a run whose adapter was made for another base (hidden size 32 instead of 64)
    mismatched = root / "mismatched-run"
    shutil.copytree(run, mismatched)
    subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out",
                    str(root / "other-run"), "--set", f"model={other}", *QUICK], check=True, capture_output=True)
    shutil.rmtree(mismatched / "adapter")
    shutil.copytree(root / "other-run" / "adapter", mismatched / "adapter")

    # a LoRA run whose adapter was replaced by a BitFit run's (another method's file)
    subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out",
                    str(root / "bitfit-run"), "--set", "method={name: bitfit}", *QUICK], check=True, capture_output=True)
    swapped = root / "swapped-run"
    shutil.copytree(run, swapped)
    shutil.rmtree(swapped / "adapter")
    shutil.copytree(root / "bitfit-run" / "adapter", swapped / "adapter")

    # a tiny llama (an mlx-lm family): a base whose layers IA3's GPT-Neo defaults do not name
    write_tiny_llama(root / "llama", vocab_size=300, tokenizer=False)

    # a run with a linear head, then one whose recipe's labels were reordered since; a features run
    subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out",
                    str(root / "head-run"), "--set", "task.head=linear", *QUICK], check=True, capture_output=True)
    relabelled = root / "relabelled-head-run"
    shutil.copytree(root / "head-run", relabelled)
    recipe = json.loads((relabelled / "recipe.json").read_text())
    recipe["prompt"]["labels"] = dict(reversed(list(recipe["prompt"]["labels"].items())))
    (relabelled / "recipe.json").write_text(json.dumps(recipe))
    broken_head = root / "broken-head-run"
    shutil.copytree(root / "head-run", broken_head)
    (broken_head / "adapter" / "head_config.json").write_text("{not json")
    subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out",
                    str(root / "features-run"), "--set", "method={name: none}", "--set", "task.name=features",
                    *QUICK], check=True, capture_output=True, env={**os.environ, "TWINTUNE_CACHE": str(root / "cache")})

    subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out",
                    str(root / "dpo-run"), "--set", "task=preference", *QUICK], check=True, capture_output=True)
    # a PPO run whose value head was saved for another model (a width of 32, not 64)
    subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out",
                    str(root / "ppo-run"), "--set", "task={name: ppo, reward: 'python:twintune.rewards.upbeat', "
                    "max_new_tokens: 2}", *QUICK], check=True, capture_output=True)
    from twintune.formats.safetensors_io import write_safetensors

    import numpy as np

    write_safetensors(root / "ppo-run" / "adapter" / "value_head.safetensors",
                      {"v_head.summary.weight": np.zeros((1, 32), np.float32),
                       "v_head.summary.bias": np.zeros(1, np.float32)})

    corrupt_ckpt = root / "corrupt-ckpt-run"
    shutil.copytree(run, corrupt_ckpt)
    for ckpt in (corrupt_ckpt / "checkpoints").iterdir():
        (ckpt / "trainable.safetensors").write_bytes(b"\x00" * 10)

    (root / "empty.csv").write_text("text,label\n")
    (root / "unlabelled.json").write_text('[{"text": "Sales rose ."}, {"text": "Costs fell ."}]')
    (root / "sentiment.csv").write_text("text,sentiment\n" + "Sales rose .,positive\n" * 40)
    (root / "bullish.csv").write_text("text,label\n" + "Sales rose .,bullish\n" * 40)
    (root / "blank.csv").write_text("text,label\n" + " ,positive\n,negative\n" * 30)
    (root / "notes.txt").write_text("not a recipe")
    (root / "blank-docs.txt").write_text("Sales rose .\n   \nCosts fell .\n")
    (root / "no-completion.jsonl").write_text('{"prompt": "Q: 1+1?"}\n')
    (root / "robot.jsonl").write_text('{"messages": [{"role": "robot", "content": "Hi"}, '
                                      '{"role": "assistant", "content": "Hello"}]}\n')
    (root / "no-chosen.jsonl").write_text('{"prompt": "Q:", "answer": " yes", "rejected": " no"}\n')
    (root / "same.jsonl").write_text('{"prompt": "Q:", "chosen": " yes", "rejected": " yes"}\n' * 10)
    (root / "bad-margin.jsonl").write_text('{"prompt": "Q:", "chosen": " yes", "rejected": " no", "margin": 1}\n'
                                           '{"prompt": "Q:", "chosen": " yes", "rejected": " no", "margin": "wide"}\n')
    (root / "long-prompt.jsonl").write_text(json.dumps({"prompt": "word " * 200, "chosen": " yes", "rejected": " no"})
                                            + "\n")
    (root / "chat-pairs.jsonl").write_text(json.dumps({"prompt": "Q:", "chosen": [{"role": "assistant", "content": "y"}],
                                                       "rejected": " no"}) + "\n")
    (root / "all-good.jsonl").write_text('{"prompt": "Q:", "completion": " yes", "label": true}\n' * 10)
    (root / "bad.yaml").write_text("train: {lr: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "no-text.yaml").write_text('prompt: {template: "Sentiment:"}\n')
    (root / "blocker").write_text("a file where a directory is wanted")
    (root / "merged").mkdir()
    (root / "merged" / "keep.txt").write_text("already here")
    (root / "comparison").mkdir()
    (root / "comparison" / "compare.json").write_text("{}")  # a comparison already written there
    return root


def case(*argv, match, env=None):
    return pytest.param(list(argv), match, env or {}, id=match[:40])


CASES = [
    case("train", DEMO, "--set", "train.lrr=1e-3", match="recipe key 'train.lrr' is unknown; did you mean 'train.lr'"),
    case("train", DEMO, "--set", "train.batch_size=abc", match="train.batch_size' must be a whole number"),
    case("train", DEMO, "--set", "method.r=-4", match="method.r' must be a positive rank"),
    case("train", DEMO, "--set", "method.r=100", match="LoRA rank r=100 is larger than layer"),
    case("train", DEMO, "--set", "method.target_modules=[q_projection]", match="q_projection"),
    case("train", DEMO, "--backend", "cuda", match="backend"),
    case("train", DEMO, "--set", "model={root}/no-such-model", match="no-such-model"),
    case("train", DEMO, "--set", "model=EleutherAI/gpt-neo-1.3B", match="cannot reach the Hugging Face hub",
         env={"HF_HUB_OFFLINE": "1"}),
    case("train", DEMO, "--set", "model={root}/corrupt-model", match="corrupt"),
    case("train", DEMO, "--set", "data.source={root}/empty.csv", match="empty.csv"),
    case("train", DEMO, "--set", "data.source={root}/bullish.csv", match="'bullish'"),
    case("train", DEMO, "--set", "data.source={root}/blank.csv", match="blank.csv"),
    case("train", DEMO, "--set", "data.source={root}/missing.csv", match="missing.csv"),
    case("train", DEMO, "--set", "data.source={root}/unlabelled.json", match="has no column 'label'; its columns are text"),
    case("eval", DEMO, "--shots", "801", match="--shots 801 asks for 801 examples of each class"),
    case("eval", DEMO, "--shots", "-1", match="--shots must be 0 or more"),
    case("eval", DEMO, "--retrieve", match="--retrieve chooses the --shots sentences; give --shots K as well"),
    case("train", DEMO, "--set", "data.source=hf:takala/financial_phrasebank", "--set", "data.split=train",
         match="cannot be loaded from the Hugging Face hub", env={"HF_HUB_OFFLINE": "1"}),
    case("train", DEMO, "--set", "data.max_length=12", match="longer than data.max_length=12"),
    case("train", DEMO, "--set", "train.lr=1e30", "--set", "train.max_grad_norm=0", match="training loss became"),
    case("train", DEMO, "--out", "{root}/blocker/run", match="not writable"),
    case("train", DEMO, "--out", "{root}/run", match="{root}/run already holds a run (recipe.json, summary.json, "
         "metrics.jsonl, checkpoints, adapter); continue it with --resume {root}/run, replace it with --overwrite"),
    case("train", "--resume", "{root}/run", "--set", "train.lr=1e-3",
         match="the recipe differs from the one it was trained with (train.lr)"),
    case("train", match="give a recipe to train (or --resume DIR alone to continue a run)"),
    case("train", DEMO, "--set", "data.source={root}/sentiment.csv",
         match="has no column 'label'; its columns are text, sentiment; set data.label_column to the column"),
    case("estimate", DEMO, "--set", "model=EleutherAI/gpt-neo-20B", env={"HF_HUB_OFFLINE": "1"},
         match="pass a local directory with its config.json (all that is read here) instead"),
    case("train", "{root}/nope.yaml", match="nope.yaml"),
    case("train", "{root}/bad.yaml", match="bad.yaml"),
    case("train", "{root}/list.yaml", match="mapping"),
    case("train", "{root}/no-text.yaml", match="{text}"),
    case("train", DEMO, "--set", "quantize.type=int3", match="quantize.type' must be none, nf4 or affine"),
    case("train", DEMO, "--set", "dtype=float128", match="'dtype' must be one of float32, bfloat16, float16, float64"),
    case("train", DEMO, "--backend", "torch", "--set", "quantize.type=affine", match="mlx backend only"),
    case("train", DEMO, "--set", "train.early_stopping_patience=2", match="needs train.eval_every"),
    case("train", DEMO, "--set", "data.validation_fraction=0", match="validation_fraction' must be between 0 and 1"),
    case("train", DEMO, "--resume", "{root}", match="holds no checkpoint"),
    case("train", DEMO, "--resume", "{root}/corrupt-ckpt-run", "--set", "train.save_every=1",
         "--set", "train.max_steps=2", "--set", "data.synthetic_size=60", match="is corrupt: trainable.safetensors"),
    case("eval", "{root}/mismatched-run", match="the adapter does not match this base model"),
    case("eval", "{root}/nowhere", match="does not exist"),
    case("eval", "{root}/run", "--split", "dev", match="split must be train, validation or test"),
    case("eval", "{root}/notes.txt", match="notes.txt"),
    case("predict", "{root}/run", " ", match="at least one non-empty text"),
    case("merge", "{root}/run", "--out", "{root}/merged", match="is not empty"),
    case("merge", "{root}", "--out", "{root}/merged2", match="not a run directory"),
    # methods: names, keys, what a model or base can take, adapters of another method
    case("train", DEMO, "--set", "method.name=lorra", match="names no method: 'lorra'; did you mean 'lora'?"),
    case("train", DEMO, "--set", "method={name: bitfit, r: 8}", match="'method.r' belongs to methods lora, dora, vera and loreft, not to bitfit"),
    case("train", DEMO, "--set", "method={name: last_blocks, n: 9}", match="method.n=9 is larger than this model's 4 blocks"),
    case("train", DEMO, "--set", "method.rank_pattern={lm_head: 2}", match="rank_pattern key 'lm_head' names no adapted layer"),
    case("train", DEMO, "--set", "method={name: vera, r: 0}", match="recipe key 'method.r' must be > 0, got 0"),
    case("train", DEMO, "--set", "method={name: vera, target_modules: [q_projection]}",
         match="VeRA target module 'q_projection' is not a linear layer of this model"),
    case("train", DEMO, "--set", "method={name: ia3, feedforward_modules: [c_fc]}",
         match="feedforward_modules must be a subset of target_modules"),
    case("train", DEMO, "--backend", "mlx", "--set", "quantize.type=affine", "--set", "method={name: dora}",
         match="method dora needs the base weights' row norms"),
    case("train", DEMO, "--backend", "mlx", "--set", "model={root}/llama", "--set", "method={name: ia3}",
         match="IA3 target module 'c_proj' is not a linear layer of this model"),
    case("train", DEMO, "--set", "method={name: full}", "--set", "quantize.type=nf4", match="quantized weights cannot be trained"),
    case("train", DEMO, "--set", "method={name: bitfit}", "--set", "dtype=float16", match="cannot train in float16"),
    case("eval", "{root}/swapped-run", match="is a bitfit adapter, but the run's recipe trains method lora"),
    case("merge", "{root}/swapped-run", "--out", "{root}/merged3", match="is a bitfit adapter"),
    case("export", "{root}/bitfit-run", "--format", "peft", "--out", "{root}/exported", match="method bitfit has no PEFT format"),
    case("export", "{root}/bitfit-run", "--format", "gguf", "--out", "{root}/bitfit.gguf",
         match="llama.cpp has no GPT-Neo architecture, so a GPT-Neo run cannot be a GGUF file"),
    # the same failures met inside the MLX backend
    case("train", DEMO, "--backend", "mlx", "--set", "train.lr=1e30", "--set", "train.max_grad_norm=0",
         match="training loss became"),
    case("train", DEMO, "--backend", "mlx", "--set", "data.max_length=12", match="longer than data.max_length=12"),
    case("train", DEMO, "--backend", "mlx", "--set", "model={root}/corrupt-model", match="corrupt"),
    case("eval", "{root}/mismatched-run", "--backend", "mlx", match="the adapter does not match this base model"),
    case("train", DEMO, "--backend", "mlx", "--resume", "{root}/corrupt-ckpt-run", "--set", "train.save_every=1",
         "--set", "train.max_steps=2", "--set", "data.synthetic_size=60", match="is corrupt: trainable.safetensors"),
    # method zoo part 2: one section per method
    case("train", DEMO, "--set", "method={name: adapter, style: parallel}",
         match="'method.style' must be houlsby or pfeiffer, got 'parallel'"),
    case("train", DEMO, "--set", "method={name: adapter, non_linearity: gelu}",
         match="'method.non_linearity' must be one of default (the style's), relu, swish, silu, gelu_new, tanh"),
    case("train", DEMO, "--set", "method={name: adapter, reduction_factor: 128}",
         match="reduction_factor=128 leaves no bottleneck for this model's hidden size 64"),
    case("train", DEMO, "--set", "method={name: adapter, reduction_factor: 0}", match="'method.reduction_factor' must be positive"),
    case("train", DEMO, "--backend", "mlx", "--set", "model={root}/llama", "--set", "method={name: adapter}",
         match="method adapter fills the blocks' attn_adapter and mlp_adapter, slots that only twintune's GPT-Neo has"),
    case("train", DEMO, "--set", "method={name: prompt, init: zeros}",
         match="'method.init' must be random, sample_vocab or text, got 'zeros'"),
    case("train", DEMO, "--set", "method={name: prompt, init: text}", match="with init: text needs init_text"),
    case("train", DEMO, "--set", "method={name: ptuning, encoder: gru}", match="'method.encoder' must be mlp or lstm"),
    case("train", DEMO, "--set", "method={name: prompt, n: 500}", "--set", "data.synthetic_size=60",
         match="is 20 tokens with its prompt, and method prompt's 500 virtual tokens make 520, past the model's 512 "
               "positions"),
    case("train", DEMO, "--backend", "mlx", "--set", "model={root}/llama", "--set", "method={name: ptuning}",
         match="method ptuning fills transformer.prompt, slots that only twintune's GPT-Neo has"),
    case("train", DEMO, "--set", "method={name: prefix, n: 500, projection: true}", "--set", "data.synthetic_size=60",
         match="method prefix's 500 virtual tokens make 520, past the model's 512 positions"),
    case("train", DEMO, "--set", "method={name: prefix, n: 512}",
         match="method prefix's n=512 virtual tokens leave no room for text in the model's 512 positions"),
    case("train", DEMO, "--set", "method={name: prefix, n: 0}", match="'method.n' must be a positive number of virtual tokens"),
    case("train", DEMO, "--set", "method={name: prefix, projection: true, encoder_hidden_size: -8}",
         match="'method.encoder_hidden_size' must be positive (or 0: the model's hidden size), got -8"),
    case("train", DEMO, "--backend", "mlx", "--set", "model={root}/llama", "--set", "method={name: prefix}",
         match="method prefix fills transformer.prefix, slots that only twintune's GPT-Neo has"),
    case("train", DEMO, "--set", "method={name: loreft, layers: [1, 7]}",
         match="method.layers names block 7, but this model has 4 blocks (0-3)"),
    case("train", DEMO, "--set", "method={name: loreft, positions: last2}",
         match="'method.positions' must be f<N>+l<M>, f<N> or l<M>"),
    case("train", DEMO, "--set", "method={name: loreft, positions: f40+l40}",
         match="fewer than the 80 that method loreft's positions f40+l40 intervene on"),
    case("train", DEMO, "--set", "method={name: loreft, r: 65}", match="LoReFT rank r=65 is larger than the model's width 64"),
    case("train", DEMO, "--backend", "mlx", "--set", "model={root}/llama", "--set", "method={name: loreft}",
         match="method loreft fills the blocks' intervention, slots that only twintune's GPT-Neo has"),
    # tasks: causal LM, classification heads and features
    case("train", DEMO, "--set", "task=causal_lm", "--set", "data.source={root}/blank-docs.txt",
         match="blank-docs.txt document 2 is empty"),
    case("train", DEMO, "--set", "task=instruction", "--set", "data.source={root}/no-completion.jsonl",
         match="no-completion.jsonl line 1 has no completion: no field 'completion' (task.completion)"),
    case("train", DEMO, "--set", "task=instruction", "--set", "data.source={root}/robot.jsonl",
         match="robot.jsonl line 1 holds chat messages, and this model's tokenizer has no chat template (GPT-Neo's has "
               "none): set data.chat_template to one"),
    case("train", DEMO, "--set", "task={name: instruction, template: 'Answer:'}",
         match="task.template 'Answer:' names no field"),
    case("train", DEMO, "--set", "task=causal_lm", "--set", "train.early_stopping_patience=2", "--set", "train.eval_every=5",
         match="'train.early_stopping_metric' must be val_loss or val_perplexity for task causal_lm"),
    case("train", DEMO, "--set", "task.name=feature", match="'task.name' names no task: 'feature'; did you mean 'features'?"),
    case("train", DEMO, "--set", "task.head=softmax", match="'task.head' must be verbalizer or linear, got 'softmax'"),
    case("train", DEMO, "--set", "task.pooling=mean", match="'task.pooling' belongs to task features, not to classification"),
    case("train", DEMO, "--set", "method={name: none}", match="method none trains nothing with the verbalizer"),
    case("train", DEMO, "--set", "task.name=features", match="task features trains no method"),
    case("train", DEMO, "--set", "method={name: none}", "--set", "task={name: features, layer: 9}",
         match="'task.layer' must be between -5 and 4 for this model of 4 blocks"),
    case("eval", "{root}/relabelled-head-run", match="was trained on labels ['negative', 'neutral', 'positive'], but "
                                                     "the labels now given (prompt.labels) are ['positive', 'neutral', 'negative']"),
    case("predict", "{root}/broken-head-run", "Sales fell .", match="is not a head configuration"),
    case("eval", "{root}/head-run", "--shots", "2", match="this run classifies with a linear head, which reads no label words"),
    case("merge", "{root}/features-run", "--out", "{root}/features-merged", match="a features run cannot be merged"),
    case("train", DEMO, "--set", "method={name: none}", "--set", "task.name=features", "--resume", "{root}/features-run",
         match="a features run has no checkpoints to resume"),
    case("train", DEMO, "--set", "task=instruction", "--set",
         "data.mixture=[{source: a.jsonl, weight: 0}, {source: b.txt, task: causal_lm, weight: 0}]",
         match="data.mixture has no positive weight: give at least one source a weight above 0"),
    case("train", DEMO, "--set", "train.replay.fraction=0.2", match="train.replay needs a source of general text"),
    case("train", DEMO, "--set", "train.distill.weight=1.0", match="train.distill needs a source of general text"),
    case("train", DEMO, "--set", "train.ewc={source: synthetic, weight: 10, samples: 0}",
         match="'train.ewc.samples' must be at least 1"),
    case("train", DEMO, "--set", "task.head=linear", "--set", "train.forgetting_eval=synthetic",
         match="train.forgetting_eval scores general text with the model's vocabulary"),
    # generation
    case("generate", "{root}/run", "Sales rose", "--max-tokens", "0", match="max_tokens must be a whole number of at least 1"),
    case("generate", "{root}/run", "Sales rose", "--top-p", "1.5", match="top_p must be a number above 0 and at most 1"),
    case("generate", "{root}/run", "Sales rose", "--temperature", "-0.5", match="temperature must be a number of at least 0"),
    case("generate", "{root}/run", "profit rose " * 300,
         match="the prompt is 603 tokens, but the model reads at most 512 positions; shorten it"),
    case("generate", "{root}/head-run", "Sales rose", match="has a classification head: it scores classes, not next tokens"),
    case("generate", "{root}/features-run", "Sales rose", match="is a features run: it holds a classifier on frozen features"),
    # several processes
    case("train", DEMO, "--nproc", "0", match="--nproc must be 1 or more, got 0"),
    case("train", DEMO, "--backend", "torch", "--set", "train.batch_size=8",
         env={"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
         match="train.batch_size 8 (the global batch) does not divide among 3 processes"),
    case("train", DEMO, "--backend", "mlx", env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": "1"},
         match="this run uses the mlx backend, which runs on several processes through mlx.launch, but it was "
               "started by torchrun"),
    case("train", DEMO, "--backend", "torch", "--set", "task.name=features", "--set", "method={name: none}",
         env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
         match="task features fits its classifier in one process"),
    case("train", DEMO, "--set", "task={name: instruction, packing: true}", "--set", "method={name: loreft}",
         match="method loreft edits each row's first and last prompt positions, which a packed row"),
    case("train", DEMO, "--set", "train.fsdp=true",
         match="train.fsdp shards full fine-tuning's weights, gradients and optimizer state; method lora's"),
    case("train", DEMO, "--backend", "mlx", "--set", "method={name: full}", "--set", "train.fsdp=true",
         match="train.fsdp shards the model through torch's FSDP2; the mlx backend keeps the whole model"),
    case("train", DEMO, "--set", "method={name: full}", "--set", "train.fsdp=true", "--set",
         "train.distill={source: synthetic, weight: 1.0}", match="train.fsdp does not combine with train.distill"),
    # preference tuning
    case("train", DEMO, "--set", "task=preference", "--set", "data.source={root}/no-chosen.jsonl",
         match="no-chosen.jsonl has no column 'chosen' (its columns are prompt, answer, rejected)"),
    case("train", DEMO, "--set", "task=preference", "--set", "data.source={root}/same.jsonl",
         match="row 1 of {root}/same.jsonl: chosen equals rejected, so the pair prefers nothing"),
    case("train", DEMO, "--set", "task=reward", "--set", "data.source={root}/long-prompt.jsonl", "--set",
         "data.max_length=64", match="its prompt is 401 tokens, leaving no room for an answer within data.max_length=64"),
    case("train", DEMO, "--set", "task=preference", "--set", "data.source={root}/chat-pairs.jsonl",
         match="column 'chosen' holds chat messages, and this model's tokenizer has no chat template"),
    case("train", DEMO, "--set", "task={name: preference, beta: 0}", match="recipe key 'task.beta' must be above 0"),
    case("train", DEMO, "--set", "task={name: preference, loss: kto}",
         match="recipe key 'task.loss' must be one of dpo, ipo, hinge, robust, orpo, simpo, got 'kto'"),
    case("train", DEMO, "--set", "task=preference", "--set", "train.replay={source: synthetic, fraction: 0.2}",
         match="train.replay scores general text with the model's vocabulary, which task preference tunes by"),
    case("train", DEMO, "--set", "task=kto", "--set", "data.source={root}/all-good.jsonl",
         match="is labelled desirable (true); KTO weighs desirable against undesirable answers and needs rows of both"),
    case("train", DEMO, "--set", "task={name: kto, undesirable_weight: 0}",
         match="recipe key 'task.undesirable_weight' must be above 0, got 0"),
    case("train", DEMO, "--set", "task={name: preference, reference: {root}/merged}",
         match="task.reference {root}/merged is not a run directory: it has no recipe.json"),
    case("train", DEMO, "--set", "task={name: preference, reference: {root}/head-run}",
         match="is a classification run with a linear head, which scores answers instead of predicting their tokens"),
    case("train", DEMO, "--set", "task={name: preference, loss: simpo, reference: {root}/dpo-run}",
         match="recipe key 'task.reference' sets a reference model, which loss simpo does not use; drop it"),
    case("train", DEMO, "--set", "task={name: grpo, reward: 'python:no_such_module.score'}",
         match="task.reward python:no_such_module.score: module 'no_such_module' cannot be imported"),
    case("train", DEMO, "--set", "task={name: grpo, reward: 'python:json.dumps'}", "--set", "task.max_new_tokens=2",
         match="task.reward python:json.dumps raised TypeError (dumps() takes 1 positional argument but 2 were given) "
               "when called as f(prompts, completions, label=...)"),
    case("train", DEMO, "--set", "task={name: grpo, reward_model: {root}/dpo-run}",
         match="task.reward_model {root}/dpo-run is a preference run; a reward model is a run of task reward"),
    case("train", DEMO, "--set", "task={name: grpo}", match="task grpo needs one reward: a function as task.reward: python:module.function"),
    case("predict", "{root}/dpo-run", "Sales rose .", match="is a preference run: it ranks answers to a prompt"),
    case("train", DEMO, "--set", "task={name: ppo}", match="task ppo needs one reward: a function as task.reward"),
    case("train", DEMO, "--set", "task=reward", "--set", "data.source={root}/bad-margin.jsonl",
         match="{root}/bad-margin.jsonl row 2 has margin 'wide'; it must be a finite number"),
    case("train", DEMO, "--set", "task={name: ppo, reward_model: {root}/dpo-run}",
         match="task.reward_model {root}/dpo-run is a preference run; a reward model is a run of task reward"),
    case("train", DEMO, "--set", "task={name: ppo, reward: 'python:twintune.rewards.upbeat', kl_estimator: k2}",
         match="recipe key 'task.kl_estimator' must be k1 or k3, got 'k2'"),
    case("train", DEMO, "--set", "task={name: ppo, reward: 'python:twintune.rewards.upbeat', num_ppo_epochs: 0}",
         match="recipe key 'task.num_ppo_epochs' must be 1 or more, got 0"),
    case("train", DEMO, "--set", "task={name: ppo, reward: 'python:twintune.rewards.upbeat', group_size: 4}",
         match="recipe key 'task.group_size' belongs to task grpo, not to ppo"),
    case("eval", "{root}/ppo-run", match="value_head.safetensors must hold v_head.summary.weight of shape (1, 64)"),
    # optimizers (train.optimizer)
    case("train", DEMO, "--set", "train.optimizer.name=adamw9bit",
         match="recipe key 'train.optimizer.name' names no optimizer: 'adamw9bit'; did you mean 'adamw8bit'?"),
    case("train", DEMO, "--set", "train.optimizer={name: sgd, betas: [0.9, 0.99]}",
         match="recipe key 'train.optimizer.betas' belongs to optimizers adamw, adamw8bit, paged_adamw, paged_adamw8bit, "
               "lion and lion8bit, not to sgd; sgd's keys are: momentum, dampening, nesterov"),
    case("train", DEMO, "--set", "train.optimizer.name=adafactor",
         match="recipe key 'train.lr' (0.00175) is unused: Adafactor's relative_step computes its own step size"),
    case("train", DEMO, "--set", "train.optimizer.name=paged_adamw8bit",
         match="optimizer paged_adamw8bit keeps its state in CUDA's paged memory (bitsandbytes), and this torch run "
               "has no CUDA GPU"),
    case("train", DEMO, "--backend", "mlx", "--set", "train.optimizer.name=paged_adamw",
         match="this mlx run has no CUDA GPU (MLX's memory is unified already); use adamw"),
    case("train", DEMO, "--set", "train.optimizer.name=adamw8bit", "--set", "dtype=float64",
         match="optimizer adamw8bit keeps 8-bit state, which a float64 run (the parity proof) has no use for"),
    case("train", DEMO, "--set", "train.optimizer.name=lion8bit", "--set", "train.fsdp=true", "--set", "method={name: full}",
         match="optimizer lion8bit keeps state over whole tensors (blocks of 256 values), which FSDP would cut"),
    case("train", DEMO, "--set", "train.optimizer={name: lion, weight_decay: 0.1}",
         match="weight decay is train.weight_decay, for every optimizer"),
    case("train", DEMO, "--set", "train.betas=[0.8, 0.9]", "--set", "train.optimizer.name=lion",
         match="recipe key 'train.betas' is AdamW's; optimizer lion takes its keys in train.optimizer"),
    case("train", DEMO, "--set", "train.optimizer={name: sgd, nesterov: true}",
         match="'train.optimizer.nesterov' needs momentum above 0 and no dampening"),
    case("train", DEMO, "--resume", "{root}/run", "--set", "train.optimizer.name=lion",
         match="it was trained with optimizer adamw and the recipe asks for lion, whose state is another"),
    # reporting (train.report_to, train.log_every)
    case("train", DEMO, "--set", "train.report_to=[tensorbord]",
         match="recipe key 'train.report_to' names 'tensorbord', which is no reporter; did you mean 'tensorboard'?"),
    case("train", DEMO, "--set", "train.report_to=[wandb, wandb]", match="names a reporter twice"),
    case("train", DEMO, "--set", "train.report_to=tensorboard", match="recipe key 'train.report_to' must be a list"),
    case("train", DEMO, "--set", "train.log_every=-5", match="recipe key 'train.log_every' must be >= 0, got -5"),
    case("train", DEMO, "--set", "train.memory_limit_gb=0", match="'train.memory_limit_gb' must be positive (or null"),
    case("train", DEMO, "--set", "train.memory_limit_gb=0.01",
         match="this run's training peak is estimated at 0.05 GB, above train.memory_limit_gb (0.01 GB)"),
    case("train", DEMO, "--set", "method={name: full}", "--set", "dtype=float16",
         match="method full trains the base model's own parameters, which cannot train in float16"),
    case("doctor", "{root}", match="is not a run directory: it has no metrics.jsonl and recipe.json"),
    case("generate", "builtin:tiny-gpt-neo", "Hi", "--chat", match="--chat renders the prompt with a chat template, and this model has none"),
    case("train", DEMO, "--set", "task=instruction", "--set", "data.source={root}/robot.jsonl", "--set",
         "data.chat_template={% for m in messages %}{{ m.content }", match="the chat template (data.chat_template, or the "
                                                                          "tokenizer's) cannot render these messages"),
    # compare (each refused before any row runs)
    case("compare", DEMO, "--methods", "lora,bitfti", match="--methods: 'bitfti' is not a comparison entry; did you mean 'bitfit'?"),
    case("compare", DEMO, "--methods", "lora,lora", match="--methods names an entry twice: lora"),
    case("compare", DEMO, "--seeds", "0", match="--seeds must be 1 or more, got 0"),
    case("compare", DEMO, "--shots", "0", match="--shots is the few-shot entry's sentences of each class: 1 or more"),
    case("compare", DEMO, "--set", "lorra.r=16", match="'lorra' is neither a recipe section"),
    case("compare", DEMO, "--methods", "lora", "--set", "dora.r=4", match="is for entry 'dora', which --methods does not run"),
    case("compare", DEMO, "--set", "train.lr=fast", match="recipe key 'train.lr' must be a number, got 'fast'"),
    case("compare", DEMO, "--methods", "bitfit,lora", "--set", "lora.r=abc",
         match="recipe key 'method.r' must be a whole number, got 'abc'"),
    case("compare", DEMO, "--out", "{root}/comparison", match="already holds a comparison; add --resume to finish it"),
]


def _digest(root: Path) -> dict:
    files = [root / "run" / "adapter" / "adapter_model.safetensors", root / "run" / "summary.json",
             root / "merged" / "keep.txt"]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("argv, match, env", CASES)
def test_bad_input_gets_one_line_and_a_nonzero_exit(world, argv, match, env):
    before = _digest(world)
    args = [a.replace("{root}", str(world)) for a in argv]
    if args[0] == "train" and "--no-progress" not in args:
        args += ["--no-progress"]
    result = subprocess.run([sys.executable, "-m", "twintune", *args], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twintune: error: "), result.stderr
    assert match.replace("{root}", str(world)) in lines[0], lines[0]
    assert _digest(world) == before


def test_the_catalogue_is_at_least_25_cases():
    assert len(CASES) >= 25


def test_a_corrupt_feature_cache_file_is_one_warning_line_and_is_recomputed(world, tmp_path):
    cache = world / "cache"
    for path in (cache / "features").iterdir():
        path.write_bytes(b"\x00" * 12)
    result = subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--backend", "torch", "--out",
                             str(tmp_path / "again"), "--set", "method={name: none}", "--set", "task.name=features",
                             *QUICK], capture_output=True, text=True, env={**os.environ, "TWINTUNE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("twintune: warning: the cached features ") for line in lines), lines
    assert all("are unreadable" in line and line.endswith("computing them again.") for line in lines)
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    first = json.loads((world / "features-run" / "summary.json").read_text())
    assert again["val_accuracy"] == first["val_accuracy"]
