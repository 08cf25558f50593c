"""Start on a MacBook, finish on a cloud GPU: a checkpoint written by one backend resumes on the
other and ends where an uninterrupted run on the other backend ends (float32: within the
backends' agreement; float64: to 1e-9), NF4 bases and dropout included."""

import json
import shutil
import sys
import subprocess

import numpy as np
import pytest

from twintune.errors import TwintuneError
from twintune.formats.safetensors_io import read_safetensors
from twintune.recipe import load_recipe
from twintune.train.loop import train

SETTINGS = ["train.max_steps=20", "train.save_every=10", "train.keep_last=2", "data.synthetic_size=200",
            "train.batch_size=8", "method.dropout=0.1"]
OTHER = {"mlx": "torch", "torch": "mlx"}


def _recipe(*extra):
    return load_recipe("recipes/demo-financial-sentiment.yaml", SETTINGS + list(extra))


def _adapter(run_dir):
    return read_safetensors(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each backend's uninterrupted 20-step run, float32 and NF4, with its checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    return {(backend, quantize): (root / f"{backend}-{quantize}",
                                  train(_recipe(f"quantize.type={quantize}"), backend, root / f"{backend}-{quantize}",
                                        progress=False))
            for backend in ("mlx", "torch") for quantize in ("none", "nf4")}


@pytest.mark.parametrize("quantize", ["none", "nf4"])
@pytest.mark.parametrize("source", ["mlx", "torch"])
def test_a_checkpoint_resumes_on_the_other_backend(runs, source, quantize, tmp_path):
    target = OTHER[source]
    source_dir, source_summary = runs[(source, quantize)]
    _, target_summary = runs[(target, quantize)]
    shutil.copytree(source_dir, tmp_path / "run")
    resumed = train(_recipe(f"quantize.type={quantize}"), target, resume=tmp_path / "run" / "checkpoints" /
                    "step-00000010", progress=False)

    assert resumed["backend"] == target and resumed["resumed_from_step"] == 10
    assert resumed["backend_steps"] == [
        {"backend": source, "first_step": 1, "last_step": 10, "processes": 1},
        {"backend": target, "first_step": 11, "last_step": 20, "processes": 1}]
    losses = np.array(resumed["train_losses"])
    assert losses[:10].tolist() == source_summary["train_losses"][:10]  # the source's own steps, kept
    expected = np.array(target_summary["train_losses"])
    assert np.abs(losses - expected).max() / expected.min() < 1e-5  # measured ~1e-7
    theirs = _adapter(runs[(target, quantize)][0])
    for name, value in _adapter(tmp_path / "run").items():
        assert np.abs(value - theirs[name]).max() <= 1e-4 * np.abs(theirs[name]).max(), name
    assert resumed["val_accuracy"] == target_summary["val_accuracy"]


OPTIMIZERS = {"adamw8bit": ["train.optimizer={name: adamw8bit, min_8bit_size: 256}"],  # LoRA's 512-value matrices
              "lion8bit": ["train.optimizer={name: lion8bit, min_8bit_size: 256}", "train.lr=3e-4"],
              "lion": ["train.optimizer={name: lion}", "train.lr=3e-4"],
              "sgd": ["train.optimizer={name: sgd, momentum: 0.9}", "train.lr=0.05"],
              "adafactor": ["train.optimizer={name: adafactor}", "train.lr=null"]}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_each_optimizers_state_resumes_from_mlx_on_torch(optimizer, tmp_path):
    """The state (8-bit codes, Adafactor's rows and columns, momentum) written by MLX continues on torch
    as torch's own run does (float32: within the backends' agreement)."""
    recipe = _recipe(*OPTIMIZERS[optimizer])
    whole = train(recipe, "torch", tmp_path / "torch", progress=False)
    train(recipe, "mlx", tmp_path / "mlx", progress=False)
    resumed = train(recipe, "torch", resume=tmp_path / "mlx" / "checkpoints" / "step-00000010", progress=False)
    losses, expected = np.array(resumed["train_losses"]), np.array(whole["train_losses"])
    assert np.abs(losses - expected).max() / expected.min() < 1e-4, optimizer
    # An 8-bit moment a code apart from the other backend's (a rounding edge the float32 drift crossed)
    # changes its value's later steps by a fraction of a step: within one learning-rate step (AdamW's
    # steps are ~lr in size), measured 0.18 of one (3.1e-4 with lr 1.75e-3) on LoRA's B.
    lr = recipe.train.base_lr
    theirs = _adapter(tmp_path / "torch")
    for name, value in _adapter(tmp_path / "mlx").items():
        tolerance = lr if optimizer.endswith("8bit") else 1e-3 * np.abs(theirs[name]).max()
        assert np.abs(value - theirs[name]).max() <= tolerance, name


def test_bfloat16_full_fine_tuning_resumes_from_mlx_on_torch(tmp_path):
    """The model's own values in bfloat16 and their compensations, written by MLX, continue on torch as
    torch's own run does: within the backends' bfloat16 agreement (losses measured 1e-3 apart)."""
    recipe = _recipe("method={name: full}", "dtype=bfloat16", "train.optimizer.name=adamw8bit", "train.lr=1e-3")
    whole = train(recipe, "torch", tmp_path / "torch", progress=False)
    train(recipe, "mlx", tmp_path / "mlx", progress=False)
    resumed = train(recipe, "torch", resume=tmp_path / "mlx" / "checkpoints" / "step-00000010", progress=False)
    assert resumed["resumed_from_step"] == 10
    losses, expected = np.array(resumed["train_losses"]), np.array(whole["train_losses"])
    assert np.abs(losses - expected).max() / expected.max() < 0.01


def test_float64_resume_across_backends_is_the_same_run_to_1e_9(tmp_path):
    recipe = _recipe("dtype=float64")
    whole = train(recipe, "torch", tmp_path / "torch", progress=False)
    train(recipe, "mlx", tmp_path / "mlx", progress=False)
    resumed = train(recipe, "torch", resume=tmp_path / "mlx" / "checkpoints" / "step-00000010", progress=False)
    losses, expected = np.array(resumed["train_losses"]), np.array(whole["train_losses"])
    assert np.abs(losses - expected).max() / expected.min() < 1e-9
    theirs = _adapter(tmp_path / "torch")
    for name, value in _adapter(tmp_path / "mlx").items():
        assert value.dtype == np.float64
        assert np.abs(value - theirs[name]).max() <= 1e-9 * np.abs(theirs[name]).max(), name


def test_an_affine_run_is_not_resumed_on_torch(tmp_path):
    recipe = _recipe("quantize.type=affine", "train.max_steps=2", "train.save_every=1")
    train(recipe, "mlx", tmp_path, progress=False)
    with pytest.raises(TwintuneError, match=r"cannot resume .*step-00000002 on torch: it was trained on mlx and "
                                            r"quantize.type 'affine' runs on the mlx backend only"):
        train(recipe, "torch", resume=tmp_path, progress=False)
    args = [sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml", "--backend", "torch",
            "--no-progress", "--resume", str(tmp_path)]
    for item in SETTINGS + ["quantize.type=affine", "train.max_steps=2", "train.save_every=1"]:
        args += ["--set", item]
    failed = subprocess.run(args, capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and failed.stderr.count("\n") == 1
    assert json.loads((tmp_path / "summary.json").read_text())["backend"] == "mlx"  # nothing saved was touched
