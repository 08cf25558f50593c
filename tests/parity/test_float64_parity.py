"""dtype float64: the two backends are the same algorithm, to rounding, over a whole run.

In float32 the backends agree to ~1e-7 early and then drift as one framework drifts from itself
when its thread count changes (benchmarks/parity_drift.py). In float64 the same rounding starts
near 1e-16, so a difference of algorithm (an op computed another way, a mask, an order of
updates) would stand out by many orders of magnitude: per-step losses must agree to 1e-9.
The whole 225-step demo (1e-8) runs in `python -m benchmarks.parity_drift`; here 60 steps.
"""

import numpy as np
import pytest

from twintune.errors import TwintuneError
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate

STEPS = 60


def _train(backend, *overrides):
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                              ["dtype=float64", f"train.max_steps={STEPS}", *overrides]), backend)
    losses = [train_step(run, step)["loss"] for step in range(STEPS)]
    return np.array(losses), run.backend.trainable_state(), evaluate(run)


@pytest.fixture(scope="module")
def both():
    return _train("mlx"), _train("torch")


def test_per_step_losses_agree_to_1e_9(both):
    (mlx_losses, _, _), (torch_losses, _, _) = both
    assert mlx_losses[-1] < 0.5 * mlx_losses[0]  # it trained: the agreement is not of two idle runs
    rel = np.abs(mlx_losses - torch_losses) / np.abs(torch_losses)
    assert rel.max() < 1e-9, (rel.max(), rel.argmax())


def test_final_adapters_agree_to_1e_9_of_their_scale(both):
    (_, mlx_state, _), (_, torch_state, _) = both
    assert set(mlx_state) == set(torch_state)
    for name, value in torch_state.items():
        assert value.dtype == np.float64 and mlx_state[name].dtype == np.float64, name
        assert np.abs(mlx_state[name] - value).max() <= 1e-9 * np.abs(value).max(), name


def test_validation_predictions_identical(both):
    (_, _, mlx_eval), (_, _, torch_eval) = both
    assert mlx_eval.predictions == torch_eval.predictions


def test_float64_with_dropout_gradient_accumulation_and_checkpointing_agrees_to_1e_9():
    """The shared dropout masks are the same bits: in float64 nothing else could explain a gap."""
    settings = ["method.dropout=0.1", "train.grad_accum=2", "train.batch_size=8", "data.synthetic_size=300"]
    steps = 12
    runs = {}
    for backend, checkpointing in (("mlx", True), ("torch", False)):
        run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                                  ["dtype=float64", f"train.max_steps={steps}", *settings,
                                   f"train.gradient_checkpointing={checkpointing}"]), backend)
        runs[backend] = (np.array([train_step(run, s)["loss"] for s in range(steps)]), run.backend.trainable_state())
    (mlx_losses, mlx_state), (torch_losses, torch_state) = runs["mlx"], runs["torch"]
    assert np.abs(mlx_losses - torch_losses).max() / np.abs(torch_losses).min() < 1e-9
    for name, value in torch_state.items():
        assert np.abs(mlx_state[name] - value).max() <= 1e-9 * np.abs(value).max(), name


def test_float64_is_refused_on_a_gpu(monkeypatch):
    import mlx.core as mx
    import torch

    from twintune.backends.mlx import backend as mlx_backend
    from twintune.backends.torch import backend as torch_backend

    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", ["dtype=float64"])
    monkeypatch.setattr(mlx_backend.mx, "default_device", lambda: mx.gpu)
    with pytest.raises(TwintuneError, match="float64 runs on the CPU only: Apple GPUs"):
        prepare(recipe, "mlx", with_data=False)
    monkeypatch.setattr(torch_backend, "_device", lambda: torch.device("cuda"))
    with pytest.raises(TwintuneError, match="float64 runs on the CPU only: .* on CUDA"):
        prepare(recipe, "torch", with_data=False)


def test_float64_on_an_nf4_base_agrees_to_1e_9():
    """The same NF4 bytes, dequantized exactly into float64 on both backends (torch: twintune's own
    NF4 layer, since bitsandbytes has no float64 kernels)."""
    steps = 8
    runs = {}
    for backend in ("mlx", "torch"):
        run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                                  ["dtype=float64", "quantize.type=nf4", "method.dropout=0.1",
                                   f"train.max_steps={steps}", "data.synthetic_size=300"]), backend)
        runs[backend] = np.array([train_step(run, s)["loss"] for s in range(steps)]), run.backend.trainable_state()
    (mlx_losses, mlx_state), (torch_losses, torch_state) = runs["mlx"], runs["torch"]
    assert mlx_losses[-1] < mlx_losses[0]
    assert np.abs(mlx_losses - torch_losses).max() / np.abs(torch_losses).min() < 1e-9
    for name, value in torch_state.items():
        assert np.abs(mlx_state[name] - value).max() <= 1e-9 * np.abs(value).max(), name
