"""The last block at the rows a loss reads (GPTNeoModel `rows`, `at_rows`) equals the whole block's
output at those rows, for every method, on both backends, in float64; and so do the gradients, with
dropout too (the rows draw the whole block's masks at their positions)."""

import numpy as np
import pytest

from twintune.data.batching import make_batch
from twintune.recipe import load_recipe
from twintune.train.build import prepare

DEMO = "recipes/demo-financial-sentiment.yaml"
ALL_LINEAR = "[q_proj, k_proj, v_proj, out_proj, c_fc, c_proj]"
METHODS = {
    "lora": f"{{name: lora, r: 4, target_modules: {ALL_LINEAR}}}",
    "dora": f"{{name: dora, r: 4, target_modules: {ALL_LINEAR}}}",
    "ia3": f"{{name: ia3, target_modules: {ALL_LINEAR}, feedforward_modules: [c_proj]}}",
    "bitfit": "{name: bitfit}",
    "houlsby": "{name: adapter, style: houlsby, reduction_factor: 4}",
    "pfeiffer": "{name: adapter, style: pfeiffer, reduction_factor: 2}",
    "prefix": "{name: prefix, n: 5, projection: true}",
    "prompt": "{name: prompt, n: 5}",
    "loreft": "{name: loreft, r: 4, positions: f2+l2}",
    "last_blocks": "{name: last_blocks, n: 1}",
}
# with dropout: the rows path draws the whole block's masks at its rows (twintune/dropout.py)
DROPOUT = {"lora-dropout": f"{{name: lora, r: 4, dropout: 0.3, target_modules: {ALL_LINEAR}}}",
           "houlsby-dropout": "{name: adapter, style: houlsby, reduction_factor: 4, dropout: 0.3}"}


def _run(backend, method, task=None):
    overrides = [f"method={({**METHODS, **DROPOUT})[method]}", "dtype=float64", "data.synthetic_size=60", "train.max_steps=1",
                 *([f"task={task}"] if task else [])]
    return prepare(load_recipe(DEMO, overrides), backend)


def _hidden(run, batch, rows):
    """(whole-model rows, rows-only path) as numpy."""
    model = run.backend.model
    if run.backend.name == "torch":
        import torch

        ids, lengths = (torch.from_numpy(a.astype(np.int64)) for a in (batch.input_ids, batch.prompt_lengths))
        index = torch.from_numpy(rows.astype(np.int64))
        with torch.no_grad():
            whole = model(ids, lengths).reshape(-1, run.spec.hidden_size)[index]
            few = model(ids, lengths, rows=index)
        return whole.numpy(), few.numpy()
    import mlx.core as mx

    ids, lengths, index = mx.array(batch.input_ids), mx.array(batch.prompt_lengths), mx.array(rows)
    whole = model(ids, lengths).reshape(-1, run.spec.hidden_size)[index]
    few = model(ids, lengths, rows=index)
    return np.array(whole), np.array(few)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("method", METHODS)
def test_the_rows_path_gives_the_whole_blocks_rows(backend, method, monkeypatch):
    from twintune.backends.mlx import gpt_neo as mlx_model
    from twintune.backends.torch import gpt_neo as torch_model

    block = (mlx_model if backend == "mlx" else torch_model).GPTNeoBlock
    calls, at_rows = [], block.at_rows
    monkeypatch.setattr(block, "at_rows", lambda *args, **kw: calls.append(1) or at_rows(*args, **kw))
    run = _run(backend, method)
    # give every trainable value a nonzero value, so each method changes the output
    rng = np.random.default_rng(0)
    run.backend.set_trainable_state({k: v + 0.05 * rng.standard_normal(v.shape) for k, v in
                                     run.backend.trainable_state().items()})
    batch = make_batch(run.splits["train"][:6])
    for rows in (batch.answer_positions, batch.target_positions):
        whole, few = _hidden(run, batch, rows)
        assert few.shape == whole.shape
        np.testing.assert_allclose(few, whole, rtol=0, atol=1e-12 * np.abs(whole).max())
    last_block_edited = method == "loreft" and run.backend.model.transformer.h[-1].intervention is not None
    assert len(calls) == (0 if last_block_edited else 2)  # LoReFT's edit of the last block: the whole block


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("method", ["lora", *DROPOUT])
def test_the_rows_path_gives_the_same_gradients(backend, method, monkeypatch):
    from twintune.backends.mlx import gpt_neo as mlx_model
    from twintune.backends.torch import gpt_neo as torch_model

    grads = []
    for few in (True, False):
        module = mlx_model if backend == "mlx" else torch_model
        monkeypatch.setattr(module, "reads_few_rows", lambda rows, batch_size, few=few: few and rows is not None)
        run = _run(backend, method, "{name: classification, head: linear}")
        run.backend.forward_backward(make_batch(run.splits["train"][:6]), 1.0, dropout_key=12345)
        grads.append(run.backend.take_gradients())
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=0, atol=1e-12 * np.abs(grads[1][name]).max())
