"""The demo recipe trained on MLX and on PyTorch: same losses, same adapter, same predictions.

Run twice: on the float32 base, and as QLoRA on an NF4 base (double quantization) where MLX uses
our own NF4 layer and PyTorch bitsandbytes' Linear4bit, both fed the same bytes.
"""

import numpy as np
import pytest

from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate

STEPS = 32


def _train(backend, overrides=()):
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml",
                         [f"train.max_steps={STEPS}", "data.synthetic_size=600", *overrides])
    run = prepare(recipe, backend)
    losses = [train_step(run, step)["loss"] for step in range(STEPS)]
    return losses, run.backend.trainable_state(), evaluate(run)


@pytest.fixture(scope="module", params=["none", "nf4"])
def both(request):
    overrides = [f"quantize.type={request.param}"]
    return _train("mlx", overrides), _train("torch", overrides)


def test_per_step_losses_agree(both):
    (mlx_losses, _, _), (torch_losses, _, _) = both
    mlx_losses, torch_losses = np.array(mlx_losses), np.array(torch_losses)
    assert len(mlx_losses) == STEPS
    assert mlx_losses[-1] < mlx_losses[0] * 0.5  # it trained, so agreement is not trivial
    rel = np.abs(mlx_losses - torch_losses) / np.abs(torch_losses)
    assert rel.max() < 1e-3, rel.max()


def test_final_lora_weights_agree(both):
    (_, mlx_state, _), (_, torch_state, _) = both
    assert set(mlx_state) == set(torch_state)
    assert any(np.abs(v).max() > 0 for k, v in torch_state.items() if "lora_B" in k)
    for name, value in torch_state.items():
        scale = np.abs(value).max()
        assert np.abs(mlx_state[name] - value).max() <= 1e-3 * scale, name


def test_validation_predictions_identical(both):
    (_, _, mlx_eval), (_, _, torch_eval) = both
    assert mlx_eval.predictions == torch_eval.predictions
    assert mlx_eval.confusion == torch_eval.confusion
