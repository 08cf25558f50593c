"""train.compile: the compiled training step gives the eager step's losses and weights."""

import numpy as np
import pytest

from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

SETTINGS = ["data.synthetic_size=200", "train.batch_size=8", "train.max_steps=10", "train.lr=3e-3",
            "train.group_by_length=true"]


def _train(backend, *extra):
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", SETTINGS + list(extra)), backend)
    shapes = {b.input_ids.shape for step in range(run.total_steps) for b in run.order.step_batches(step)}
    losses = [train_step(run, step)["loss"] for step in range(run.total_steps)]
    return np.array(losses), run.backend.trainable_state(), len(shapes)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mlx_compiled_step_is_the_eager_step_dropout_included(checkpointing):
    extra = ["method.dropout=0.1", f"train.gradient_checkpointing={checkpointing}"]
    eager, eager_state, shapes = _train("mlx", *extra)
    compiled, compiled_state, _ = _train("mlx", *extra, "train.compile=true")
    assert shapes > 1  # batches of several lengths: each compiles once
    np.testing.assert_array_equal(compiled, eager)
    for name, value in eager_state.items():
        np.testing.assert_array_equal(compiled_state[name], value)


def test_torch_compiled_step_follows_the_eager_step_dropout_included():
    """The compiled graph computes the shared dropout masks (twintune/dropout.py) as the eager step does,
    and the per-step key is a tensor input: a new step's masks compile nothing new."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, eager_state, shapes = _train("torch", "method.dropout=0.1")
    compiled, compiled_state, _ = _train("torch", "method.dropout=0.1", "train.compile=true")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert shapes > 1 and 1 <= graphs < len(eager)  # really compiled, and not once per step
    assert np.abs(compiled - eager).max() / eager.max() < 1e-4  # fused kernels round differently
    for name, value in eager_state.items():
        assert np.abs(compiled_state[name] - value).max() <= 1e-4 * np.abs(value).max() + 1e-6
