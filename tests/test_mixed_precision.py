"""Mixed precision: `dtype: bfloat16 | float16` holds and runs the frozen model in that dtype on both
backends, keeps the adapter, its gradients and AdamW in float32, and (float16) scales the loss."""

import functools
import json
import shutil

import numpy as np
import pytest
import torch

from twintune.backends.mlx.backend import MLXBackend
from twintune.backends.torch.backend import TorchBackend
from twintune.errors import TwintuneError
from twintune.formats.checkpoint import load_checkpoint
from twintune.models import GPTNeoSpec, gpt_neo_weights
from twintune.quant import Quantization, quantize_linear_layers
from twintune.recipe import load_recipe
from twintune.train import build
from twintune.train.loss_scale import LossScaler
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.loop import train

LOW = ["bfloat16", "float16"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SETTINGS = ["data.synthetic_size=200", "train.batch_size=8", "train.max_steps=12", "train.lr=3e-3"]


def _model(model_dir):
    ckpt = load_checkpoint(str(model_dir))
    spec = GPTNeoSpec.from_config(ckpt.config)
    return spec, gpt_neo_weights(spec, ckpt.weights)


def _transformers_logits(model_dir, ids, dtype):
    from transformers import GPTNeoForCausalLM

    model = GPTNeoForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype]).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_logits_are_as_close_to_float32_as_transformers_own(tiny_window_dir, dtype):
    spec, weights = _model(tiny_window_dir)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 40)).astype(np.int32)  # past the window
    exact = _transformers_logits(tiny_window_dir, ids, "float32")
    scale = np.abs(exact).max()
    error = lambda a, b: np.abs(a - b).max() / scale  # noqa: E731
    reference_error = error(_transformers_logits(tiny_window_dir, ids, dtype), exact)
    mlx_logits = MLXBackend(spec, weights, dtype=dtype).logits(ids)
    torch_logits = TorchBackend(spec, weights, dtype=dtype).logits(ids)

    assert 0 < error(mlx_logits, exact) < 1.5 * reference_error  # really reduced precision, and no worse
    assert 0 < error(torch_logits, exact) < 1.5 * reference_error
    assert error(mlx_logits, torch_logits) < 2 * reference_error


def test_nf4_computes_in_the_dtype_on_both_backends(tiny_dir):
    spec, weights = _model(tiny_dir)
    quantized = quantize_linear_layers(dict(weights), list(spec.linear_layers()), Quantization("nf4"))
    rest = {k: v for k, v in weights.items() if not (k.endswith(".weight") and k[: -len(".weight")] in quantized)}
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (2, 24)).astype(np.int32)
    full = MLXBackend(spec, rest, quantized=quantized).logits(ids)
    scale = np.abs(full).max()
    mlx_bf16 = MLXBackend(spec, rest, quantized=quantized, dtype="bfloat16").logits(ids)
    torch_bf16 = TorchBackend(spec, rest, quantized=quantized, dtype="bfloat16").logits(ids)
    assert 1e-4 < np.abs(mlx_bf16 - full).max() / scale < 0.02
    assert np.abs(mlx_bf16 - torch_bf16).max() / scale < 0.02
    linear = TorchBackend(spec, rest, quantized=quantized, dtype="bfloat16").model.transformer.h[0].mlp.c_fc
    assert linear.compute_dtype == torch.bfloat16  # bitsandbytes' own compute dtype


def _dtypes(backend):
    """(frozen float dtypes, trainable dtypes) of a backend's model, as strings."""
    if backend.name == "torch":
        frozen = {str(p.dtype) for p in backend.model.parameters() if not p.requires_grad and p.is_floating_point()}
        trainable = {str(p.dtype) for p in backend.model.parameters() if p.requires_grad}
        return {d.replace("torch.", "") for d in frozen}, {d.replace("torch.", "") for d in trainable}
    from mlx.utils import tree_flatten

    names = dict(tree_flatten(backend.model.trainable_parameters()))
    frozen = {str(v.dtype) for k, v in tree_flatten(backend.model.parameters()) if k not in names}
    return {d.replace("mlx.core.", "") for d in frozen}, {str(v.dtype).replace("mlx.core.", "") for v in names.values()}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("dtype", LOW)
def test_the_frozen_model_is_held_in_the_dtype_and_the_adapter_in_float32(backend, dtype):
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", SETTINGS + [f"dtype={dtype}"]), backend)
    frozen, trainable = _dtypes(run.backend)
    assert frozen == {dtype} and trainable == {"float32"}
    train_step(run, 0)
    assert {v.dtype for v in run.backend.optimizer_state().values() if v.size > 1} == {np.dtype(np.float32)}


@functools.lru_cache(maxsize=None)
def _losses(backend, dtype):
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", SETTINGS + [f"dtype={dtype}"])
    run = prepare(recipe, backend)
    if run.loss_scaler:  # every step is compared with float32's, so none may be skipped: the default start,
        run.loss_scaler.scale = 2.0**12  # 2^16, overflows once (step 2, both backends alike) and skips it
    records = [train_step(run, step) for step in range(run.total_steps)]
    assert not any(r.get("skipped") for r in records)
    return np.array([r["loss"] for r in records])


@pytest.mark.parametrize("dtype", LOW)
def test_training_in_low_precision_follows_float32_on_both_backends(dtype):
    exact = _losses("torch", "float32")
    assert exact[-1] < 0.5 * exact[0]  # it learns
    for backend in ("mlx", "torch"):
        losses = _losses(backend, dtype)
        assert not np.array_equal(losses, exact)
        assert np.abs(losses - exact).max() / exact.max() < 0.01, (backend, losses, exact)
    assert np.abs(_losses("mlx", dtype) - _losses("torch", dtype)).max() / exact.max() < 0.01


FULL = ["data.synthetic_size=200", "train.batch_size=8", "train.max_steps=12", "method={name: full}",
        "train.optimizer.name=adamw8bit", "train.lr=1e-3"]


@functools.lru_cache(maxsize=None)
def _full_fine_tuning(backend, dtype):
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", FULL + [f"dtype={dtype}"]), backend)
    losses = np.array([train_step(run, step)["loss"] for step in range(run.total_steps)])
    return losses, _dtypes(run.backend), run.backend.optimizer_state()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_full_fine_tuning_in_bfloat16_trains_the_model_in_bfloat16_with_a_compensation(backend):
    """Every parameter trains in bfloat16; beside each, its compensation (what rounding the float32
    step's result to bfloat16 dropped: optimizers.compensated_update), saved exactly (as float32)."""
    _, (frozen, trainable), state = _full_fine_tuning(backend, "bfloat16")
    assert trainable == {"bfloat16"} and frozen <= {"bfloat16"}
    compensation = {k: v for k, v in state.items() if k.startswith("compensation.")}
    assert len(compensation) == len([k for k in state if k.startswith("m.")]) > 0
    assert all(v.dtype == np.float32 for v in compensation.values())
    assert all(np.array_equal(torch.from_numpy(v).bfloat16().float().numpy(), v) for v in compensation.values())  # exact
    assert any(np.abs(v).max() > 0 for v in compensation.values())


def test_full_fine_tuning_in_bfloat16_follows_float32_on_both_backends():
    """12 steps at lr 1e-3: each backend's bfloat16 losses within 5% of float32's largest (measured 2.6%:
    every weight is rounded to bfloat16, not only the frozen ones), and within 1% of each other
    (measured 0.33%)."""
    exact = _full_fine_tuning("torch", "float32")[0]
    assert exact[-1] < 0.5 * exact[0]  # it learns
    mlx_losses, torch_losses = _full_fine_tuning("mlx", "bfloat16")[0], _full_fine_tuning("torch", "bfloat16")[0]
    for losses in (mlx_losses, torch_losses):
        assert not np.array_equal(losses, exact)
        assert np.abs(losses - exact).max() / exact.max() < 0.05, (losses, exact)
    assert np.abs(mlx_losses - torch_losses).max() / exact.max() < 0.01


def test_loss_scaler_halves_on_overflow_and_doubles_after_a_run_of_good_steps():
    scaler = LossScaler(scale=1024.0, growth_interval=3)
    scaler.update(finite=False)
    assert scaler.scale == 512.0
    for _ in range(2):
        scaler.update(finite=True)
    assert scaler.scale == 512.0
    scaler.update(finite=False)  # an overflow restarts the count
    for _ in range(3):
        scaler.update(finite=True)
    assert scaler.scale == 512.0 and scaler.good_steps == 0
    assert LossScaler(**scaler.state()) == scaler


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_float16_overflow_skips_the_step_and_halves_the_loss_scale(backend):
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", SETTINGS + ["dtype=float16"]), backend)
    before = run.backend.trainable_state()
    run.loss_scaler.scale = 2.0**60  # the backward overflows float16
    record = train_step(run, 0)
    assert record["skipped"] and record["grad_norm"] is None and np.isfinite(record["loss"])
    assert run.loss_scaler.scale == 2.0**59
    assert run.backend.step == 0  # AdamW's bias correction did not advance
    after = run.backend.trainable_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)

    run.loss_scaler.scale = 2.0**10
    record = train_step(run, 1)
    assert not record["skipped"] and np.isfinite(record["grad_norm"])
    assert run.backend.step == 1
    assert any(not np.array_equal(before[k], v) for k, v in run.backend.trainable_state().items())


def test_gradients_that_are_not_finite_without_loss_scaling_stop_the_run():
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", SETTINGS), "torch")
    run.backend.optimizer_step = lambda *args, **kwargs: float("nan")
    with pytest.raises(TwintuneError, match="gradients became nan at step 1"):
        train_step(run, 0)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_float16_resume_restores_the_loss_scale(backend, tmp_path, monkeypatch):
    # Start so high that the first steps overflow: the scale at the checkpoint differs from a fresh one.
    monkeypatch.setattr(build, "LossScaler", functools.partial(LossScaler, scale=2.0**20))
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml",
                         SETTINGS + ["dtype=float16", "train.save_every=6", "train.keep_last=2"])
    whole = train(recipe, backend, tmp_path / "whole", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("skipped") for line in lines) and not lines[-2]["skipped"]

    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000012")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["history"]["loss_scale"]["scale"] < 2.0**20
    resumed = train(recipe, backend, resume=tmp_path / "resumed", progress=False)
    assert resumed["resumed_from_step"] == 6
    assert resumed["train_losses"] == whole["train_losses"]


def test_an_unknown_dtype_is_refused():
    with pytest.raises(TwintuneError, match="recipe key 'dtype' must be one of float32, bfloat16, float16, float64, "
                                            "got 'float128'"):
        load_recipe("recipes/demo-financial-sentiment.yaml", ["dtype=float128"])
