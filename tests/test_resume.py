"""Checkpoints: a run killed with SIGKILL and resumed ends exactly like one never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from twintune.errors import TwintuneError
from twintune.formats.safetensors_io import read_safetensors
from twintune.recipe import load_recipe
from twintune.train.loop import train

SETTINGS = ["train.max_steps=60", "train.save_every=10", "train.keep_last=2", "data.synthetic_size=200",
            "train.batch_size=8", "train.eval_every=20"]


def _cli(backend, out, *extra, settings=SETTINGS):
    args = [sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml", "--backend", backend,
            "--out", str(out), "--no-progress", *extra]
    for item in settings:
        args += ["--set", item]
    return args


def _adapter(run_dir):
    """The trained values: the adapter's, or full fine-tuning's whole model."""
    adapter = run_dir / "adapter"
    return read_safetensors(adapter / ("model.safetensors" if (adapter / "model.safetensors").exists()
                                       else "adapter_model.safetensors"))


TASKS = {"classification": "classification", "preference": "preference",  # DPO, its reference the base view
         "grpo": "{name: grpo, reward: 'python:twintune.rewards.upbeat', max_new_tokens: 2, group_size: 2}",
         # three epochs a rollout: checkpoints at steps 10 and 20 fall inside rollouts, which they keep
         "ppo": "{name: ppo, reward: 'python:twintune.rewards.upbeat', max_new_tokens: 2, num_ppo_epochs: 3}"}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(backend, task, tmp_path):
    """GRPO too: its completions are drawn from (seed, step, micro-batch, prompt, sample) and the restored
    model, so the resumed run samples what the uninterrupted one did; PPO's rollout is in the checkpoint."""
    _sigkill_then_resume(backend, [*SETTINGS, f"task={TASKS[task]}"], tmp_path)


# LoRA's matrices are 512 values: min_8bit_size 256 gives them 8-bit state
OPTIMIZERS = {"adamw8bit": "{name: adamw8bit, min_8bit_size: 256}", "lion8bit": "{name: lion8bit, min_8bit_size: 256}",
              "lion": "{name: lion}", "sgd": "{name: sgd, momentum: 0.9, nesterov: true}", "adafactor": "{name: adafactor}"}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_sigkill_then_resume_equals_an_uninterrupted_run_with_each_optimizer(backend, optimizer, tmp_path):
    lr = {"lion": "3e-4", "lion8bit": "3e-4", "sgd": "0.05", "adafactor": "null"}.get(optimizer)  # else the demo's
    settings = [*SETTINGS, "train.max_steps=30", f"train.optimizer={OPTIMIZERS[optimizer]}"] + \
        ([f"train.lr={lr}"] if lr else [])
    killed = _sigkill_then_resume(backend, settings, tmp_path)
    state = read_safetensors(killed / "checkpoints" / "step-00000030" / "optimizer.safetensors")
    codes = [name for name in state if name.startswith(("m.", "v.")) and state[name].dtype == np.uint8]
    assert bool(codes) == optimizer.endswith("8bit")  # the codes saved as they are, one byte a value


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_sigkill_then_resume_equals_an_uninterrupted_run_of_bfloat16_full_fine_tuning(backend, tmp_path):
    """The model's own values in bfloat16, each with its compensation in the checkpoint (as float32:
    exact), so the resumed run rounds as the uninterrupted one did."""
    settings = [*SETTINGS, "train.max_steps=30", "method={name: full}", "dtype=bfloat16",
                "train.optimizer.name=adamw8bit", "train.lr=1e-3"]
    killed = _sigkill_then_resume(backend, settings, tmp_path)
    state = read_safetensors(killed / "checkpoints" / "step-00000030" / "optimizer.safetensors")
    compensation = [state[name] for name in state if name.startswith("compensation.")]
    assert compensation and all(c.dtype == np.float32 for c in compensation) and any(np.abs(c).max() > 0
                                                                                     for c in compensation)


def _sigkill_then_resume(backend, settings, tmp_path):
    """Train to the end; train again, SIGKILL it after the step-20 checkpoint, resume it: the same run."""
    whole = train(load_recipe("recipes/demo-financial-sentiment.yaml", settings), backend, tmp_path / "whole",
                  progress=False)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(backend, killed, settings=settings), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-00000020").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists()  # it really died mid-training

    resumed = subprocess.run(_cli(backend, killed, "--resume", str(killed), settings=settings), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 20
    assert summary["train_losses"] == whole["train_losses"]
    assert (killed / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    expected, got = _adapter(tmp_path / "whole"), _adapter(killed)
    assert expected.keys() == got.keys()
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    assert len(list((killed / "checkpoints").iterdir())) == 2  # keep_last
    return killed


def test_corrupt_checkpoint_is_named_and_an_earlier_one_offered(tmp_path):
    out = tmp_path / "run"
    settings = SETTINGS[1:] + ["train.max_steps=20"]
    train(load_recipe("recipes/demo-financial-sentiment.yaml", settings), "torch", out, progress=False)
    newest = out / "checkpoints" / "step-00000020"
    data = (newest / "optimizer.safetensors").read_bytes()
    (newest / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TwintuneError, match=r"step-00000020 is corrupt: optimizer.safetensors.*step-00000010"):
        train(load_recipe("recipes/demo-financial-sentiment.yaml", settings), "torch", resume=out, progress=False)
    # the CLI: one line, exit 2, and resuming from the earlier checkpoint works
    args = [sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml", "--backend", "torch",
            "--no-progress", "--resume", str(out)] + [a for item in settings for a in ("--set", item)]
    failed = subprocess.run(args, capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    args[args.index(str(out))] = str(out / "checkpoints" / "step-00000010")
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0


def test_resume_refuses_a_different_recipe(tmp_path):
    out = tmp_path / "run"
    settings = SETTINGS[1:] + ["train.max_steps=10"]
    train(load_recipe("recipes/demo-financial-sentiment.yaml", settings), "torch", out, progress=False)
    changed = load_recipe("recipes/demo-financial-sentiment.yaml", settings + ["train.lr=1e-2"])
    with pytest.raises(TwintuneError, match=r"recipe differs.*train\.lr"):
        train(changed, "torch", resume=out, progress=False)
    with pytest.raises(TwintuneError, match="trained with optimizer adamw and the recipe asks for lion"):
        train(load_recipe("recipes/demo-financial-sentiment.yaml", settings + ["train.optimizer.name=lion"]), "torch",
              resume=out, progress=False)
    with pytest.raises(TwintuneError, match="holds no checkpoint"):
        train(changed, "torch", resume=tmp_path, progress=False)
    # resuming a finished run trains nothing more and writes the same result
    first = json.loads((out / "summary.json").read_text())
    again = train(load_recipe("recipes/demo-financial-sentiment.yaml", settings), "torch", resume=out, progress=False)
    assert again["train_losses"] == first["train_losses"] and again["val_accuracy"] == first["val_accuracy"]


def test_early_stopping_keeps_the_best_adapter_and_the_run_has_a_plot(tmp_path):
    settings = ["data.synthetic_size=200", "train.batch_size=8", "train.max_steps=40", "train.eval_every=4",
                "train.early_stopping_patience=2", "train.lr=1e-9", "train.warmup_steps=0", "train.save_every=4",
                "train.keep_last=5"]
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", settings)
    summary = train(recipe, "torch", tmp_path, progress=False)
    # nothing improves at lr 1e-9: best is the first evaluation (step 4), two more evaluations, stop
    assert summary["stopped_early"] and summary["steps"] == 12 and summary["best"]["step"] == 4
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = _adapter(tmp_path)
    again = train(recipe, "torch", resume=tmp_path / "checkpoints" / "step-00000008", progress=False)
    assert again["steps"] == 12 and again["best"] == summary["best"] and again["train_losses"] == summary["train_losses"]
    assert all(np.array_equal(best[k], v) for k, v in _adapter(tmp_path).items())
    finished = train(recipe, "torch", resume=tmp_path, progress=False)  # its newest checkpoint: the stop itself
    assert finished["steps"] == 12 and finished["stopped_early"] and finished["best"] == summary["best"]
    with pytest.raises(TwintuneError, match="needs train.eval_every"):
        load_recipe("recipes/demo-financial-sentiment.yaml", ["train.early_stopping_patience=2"])
