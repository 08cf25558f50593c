"""train.gradient_checkpointing: the same training, with blocks recomputed in the backward."""

import gc

import numpy as np
import pytest

from twintune.data.batching import Batch
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

SETTINGS = ["data.synthetic_size=120", "train.batch_size=8", "method.dropout=0.1",
            "method.target_modules=[q_proj,k_proj,v_proj,out_proj,c_fc,c_proj]"]


def _train(backend, checkpointing, steps=3):
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                              SETTINGS + [f"train.gradient_checkpointing={str(checkpointing).lower()}"]), backend)
    losses = [train_step(run, step)["loss"] for step in range(steps)]
    return run, losses


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_checkpointing_changes_nothing_but_memory(backend):
    _, plain_losses = _train(backend, False)
    run, losses = _train(backend, True)
    plain_run, _ = _train(backend, False)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)  # dropout masks replayed in the recompute
    ours, theirs = run.backend.trainable_state(), plain_run.backend.trainable_state()
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


def test_mlx_checkpointing_lowers_the_peak():
    import mlx.core as mx

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (16, 128)).astype(np.int32)
    answer = (np.arange(16) * 128 + 126).astype(np.int32)
    # a loss on every position (a causal LM's): every block runs whole on both paths (a loss that reads one
    # position per row runs the last block at those rows only, lowering the plain path's peak too)
    every = (np.arange(16)[:, None] * 128 + np.arange(127)[None, :]).reshape(-1).astype(np.int32)
    batch = Batch(input_ids=ids, target_positions=every, targets=ids[:, 1:].reshape(-1).copy(), answer_positions=answer,
                  labels=np.zeros(16, np.int32), lengths=np.full(16, 128))
    peaks = {}
    for dropout in (0.0, 0.1):
        for checkpointing in (False, True):
            run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                                      SETTINGS + [f"method.dropout={dropout}",
                                                  f"train.gradient_checkpointing={str(checkpointing).lower()}"]), "mlx")
            gc.collect()  # arrays that earlier tests left in reference cycles would count in both peaks
            mx.reset_peak_memory()
            run.backend.forward_backward(batch, 1.0 / every.size, dropout_key=1)
            peaks[dropout, checkpointing] = mx.get_peak_memory()
            del run
    # 4 blocks: the recomputed block and the backward's short-lived arrays remain (0.57 measured)
    assert peaks[0.0, True] < 0.7 * peaks[0.0, False]
    # With dropout the plain path keeps a 1-byte mask per element (0.61 measured: the shared masks are
    # boolean, where MLX's own dropout kept a float32 one and the plain path's peak was 15% higher)
    assert peaks[0.1, True] < peaks[0.1, False]


def test_torch_checkpointing_runs_each_block_again_in_the_backward():
    run, _ = _train("torch", True, steps=0)
    calls = []
    # a submodule: the recompute calls the block's forward directly (and stops once the saved tensors are
    # back), its first part through its hooks
    run.backend.model.transformer.h[0].ln_1.register_forward_hook(lambda *args: calls.append(1))
    train_step(run, 0)
    assert len(calls) == 2
