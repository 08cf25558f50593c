"""The loss over many target rows in chunks (backends/base.py loss_chunks): each chunk's vocabulary
logits are recomputed in the backward instead of kept, and the loss, its gradients and the
evaluation's loss are the unchunked ones (float64, both backends; full fine-tuning included, whose
tied output layer gets its gradient through every chunk)."""

import numpy as np
import pytest

import twintune.backends.base as base
from twintune.data.batching import make_batch
from twintune.recipe import load_recipe
from twintune.train.build import prepare

DEMO = "recipes/demo-financial-sentiment.yaml"
METHODS = {"lora": "method={name: lora, r: 4, dropout: 0.2, target_modules: [q_proj, v_proj, c_fc]}",
           "full": 'method={"name": "full"}'}


def test_chunks_cover_the_rows_in_order():
    assert base.loss_chunks(40, 1000) == [(0, 40)]
    for rows, vocabulary in ((5000, 50257), (7, 2**26), (1, 2**27), (2**20, 64)):
        chunks = base.loss_chunks(rows, vocabulary)
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all((stop - start) * vocabulary <= max(base.LOSS_CHUNK_VALUES, vocabulary) for start, stop in chunks)


def _loss_and_gradients(backend, method, chunk_rows, monkeypatch):
    run = prepare(load_recipe(DEMO, ["task=causal_lm", "data.synthetic_size=60", "data.max_length=32", "dtype=float64",
                                     METHODS[method]]), backend)
    vocabulary = run.spec.vocab_size
    monkeypatch.setattr(base, "LOSS_CHUNK_VALUES", chunk_rows * vocabulary if chunk_rows else 2**40)
    batch = make_batch(run.splits["train"][:4])
    assert len(base.loss_chunks(batch.n_targets, vocabulary)) == (-(-batch.n_targets // chunk_rows) if chunk_rows else 1)
    loss = run.backend.forward_backward(batch, 1.0, dropout_key=99)
    return loss, run.backend.take_gradients(), run.backend.target_loss(batch)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_chunked_loss_equals_the_whole_one(backend, method, monkeypatch):
    whole_loss, whole_grads, whole_eval = _loss_and_gradients(backend, method, None, monkeypatch)
    loss, grads, evaluation = _loss_and_gradients(backend, method, 7, monkeypatch)  # 7-row chunks of ~120 rows
    assert loss == pytest.approx(whole_loss, rel=1e-12) and evaluation == pytest.approx(whole_eval, rel=1e-12)
    assert set(grads) == set(whole_grads)
    if method == "full":
        assert np.abs(grads["transformer.wte.weight"]).max() > 0  # the tied output layer learns through the chunks
    for name, expected in whole_grads.items():
        np.testing.assert_allclose(grads[name], expected, rtol=0, atol=1e-11 * max(np.abs(expected).max(), 1e-30),
                                   err_msg=name)
