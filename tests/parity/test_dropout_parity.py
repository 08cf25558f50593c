"""Dropout: both backends drop the same elements (twintune/dropout.py), so runs with dropout agree
as runs without it do, and every way of running a step draws the masks the plain step draws."""

import contextlib

import mlx.core as mx
import numpy as np
import pytest
import torch

from twintune.backends.mlx.dropout import dropout as mlx_dropout
from twintune.backends.torch.dropout import dropout as torch_dropout
from twintune.dropout import dropout_key, dropout_masks, dropout_rows, dropout_stream, keep_mask, mix32
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

STEPS = 32


def _mueller(x: int) -> int:
    """The hash as published (uint32 arithmetic, spelled with % 2**32): the reference for mix32."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
    return (x >> 16) ^ x


def test_mix32_is_muellers_hash_on_ints_numpy_mlx_and_torch():
    values = [0, 1, 2, 12345, 2**31, 2**32 - 1] + list(range(1000, 100_000, 997))
    expected = [_mueller(v) for v in values]
    assert expected[:3] == [0, 824515495, 1722258072]  # pinned: a changed formula changes every mask
    assert [mix32(v) for v in values] == expected
    assert mix32(np.array(values, np.uint32)).tolist() == expected
    assert np.array(mix32(mx.array(values, dtype=mx.uint32))).tolist() == expected
    assert mix32(torch.tensor(values, dtype=torch.int64)).tolist() == expected


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,p", [((3, 7, 40), 0.1), ((2, 5, 64), 0.5), ((1000,), 0.05)])
def test_both_backends_draw_the_reference_mask(shape, p, dtype):
    key = dropout_key(7, 3, 1)
    stream = dropout_stream("transformer.h.1.mlp.c_fc")
    values = np.random.default_rng(0).normal(size=shape).astype(dtype)
    with dropout_masks(mx.array(key, dtype=mx.uint32)):
        ours_mlx = np.array(mlx_dropout(mx.array(values, dtype=getattr(mx, dtype)), p, stream, True))
    with dropout_masks(torch.tensor(key)):
        ours_torch = torch_dropout(torch.from_numpy(values), p, stream, True).numpy()
    keep = keep_mask(key, "transformer.h.1.mlp.c_fc", shape, p)
    expected = np.where(keep, values * np.asarray(1 / (1 - p), dtype=dtype), 0)
    np.testing.assert_array_equal(ours_mlx, expected)
    np.testing.assert_array_equal(ours_torch, expected)
    assert ours_mlx.dtype == ours_torch.dtype == np.dtype(dtype)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_share_of_the_rows_and_the_rows_path_draw_the_whole_batchs_bits(backend):
    """A process's share (rows 2..3 of 5, re-padded from width 9 to 6: first_row 2, width_pad 3)
    and at_rows' (N, d) rows draw what one process draws for those elements of the whole batch."""
    key, name, p = dropout_key(3, 1, 0), "transformer.h.0.attn.attention.q_proj", 0.3
    stream = dropout_stream(name)
    whole = keep_mask(key, name, (5, 9, 16), p)
    np.testing.assert_array_equal(keep_mask(key, name, (2, 6, 16), p, first_row=2, width_pad=3), whole[2:4, :6])
    batch, position = np.array([0, 3, 3, 4]), np.array([8, 0, 5, 2])
    np.testing.assert_array_equal(keep_mask(key, name, (4, 16), p, rows=(batch, position, 9)), whole[batch, position])
    share_rows = keep_mask(key, name, (2, 16), p, first_row=3, width_pad=3, rows=(np.array([0, 1]), np.array([5, 2]), 6))
    np.testing.assert_array_equal(share_rows, whole[[3, 4], [5, 2]])  # both: at_rows in a share

    if backend == "mlx":
        def run(shape, first_row=0, width_pad=0, rows=None):
            with dropout_masks(mx.array(key, dtype=mx.uint32), mx.array(first_row, dtype=mx.uint32),
                               mx.array(width_pad, dtype=mx.uint32)):
                with dropout_rows(*(mx.array(a) for a in rows[:2]), rows[2]) if rows else contextlib.nullcontext():
                    return np.array(mlx_dropout(mx.ones(shape), p, stream, True)) != 0
    else:
        def run(shape, first_row=0, width_pad=0, rows=None):
            with dropout_masks(torch.tensor(key), torch.tensor(first_row), torch.tensor(width_pad)):
                with dropout_rows(*(torch.from_numpy(a) for a in rows[:2]), rows[2]) if rows else contextlib.nullcontext():
                    return torch_dropout(torch.ones(shape), p, stream, True).numpy() != 0
    np.testing.assert_array_equal(run((5, 9, 16)), whole)
    np.testing.assert_array_equal(run((2, 6, 16), 2, 3), whole[2:4, :6])
    np.testing.assert_array_equal(run((4, 16), rows=(batch, position, 9)), whole[batch, position])
    np.testing.assert_array_equal(run((2, 16), 3, 3, rows=(np.array([0, 1]), np.array([5, 2]), 6)), share_rows)
    np.testing.assert_array_equal(run((3, 16)), keep_mask(key, name, (3, 16), p))  # not batch-shaped: its own index


def test_masks_keep_1_minus_p_and_look_independent():
    """Keep rate within 4 sigma; masks of other layers, steps and micro-batches uncorrelated (|z| < 5)."""
    shape, p = (8, 64, 256), 0.1
    n = int(np.prod(shape))
    names = ["transformer.h.0.attn.attention.q_proj", "transformer.h.0.attn.attention.v_proj",
             "transformer.h.1.attn.attention.q_proj"]
    masks = [keep_mask(dropout_key(0, step, micro), name, shape, p).reshape(-1)
             for step in (0, 1) for micro in (0, 1) for name in names]
    for mask in masks:
        assert abs(mask.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / n)
    z = np.corrcoef(np.stack(masks).astype(np.float32))[np.triu_indices(len(masks), 1)] * np.sqrt(n)
    assert np.abs(z).max() < 5
    neighbours = np.corrcoef(masks[0][:-1].astype(np.float32), masks[0][1:].astype(np.float32))[0, 1]
    assert abs(neighbours) * np.sqrt(n) < 5
    assert not np.array_equal(keep_mask(dropout_key(1, 0, 0), names[0], shape, p), masks[0].reshape(shape))


def _train(backend, *overrides, steps=STEPS):
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                              [f"train.max_steps={steps}", "data.synthetic_size=600", "method.dropout=0.1",
                               *overrides]), backend)
    return np.array([train_step(run, step)["loss"] for step in range(steps)]), run.backend.trainable_state()


@pytest.fixture(scope="module")
def both():
    return _train("mlx"), _train("torch")


def test_demo_with_dropout_gives_the_same_losses_and_weights(both):
    (mlx_losses, mlx_state), (torch_losses, torch_state) = both
    assert mlx_losses[-1] < 0.5 * mlx_losses[0]
    assert np.abs(mlx_losses - torch_losses).max() / np.abs(torch_losses).min() < 1e-3
    assert abs(mlx_losses[0] - torch_losses[0]) <= 1e-6 * torch_losses[0]  # the same masks from the first step
    for name, value in torch_state.items():
        assert np.abs(mlx_state[name] - value).max() <= 1e-3 * np.abs(value).max(), name


def test_dropout_changes_the_run(both):
    """The masks are really applied: without dropout the first step's loss is another number."""
    (mlx_losses, _), _ = both
    plain, _ = _train("mlx", "method.dropout=0.0", steps=3)
    # lora_B starts at zero and the warmup's first learning rate is 0: dropout of the adapter's
    # input changes nothing until the adapter has moved (step 2, after step 1's update).
    assert plain[0] == mlx_losses[0]
    assert abs(plain[2] - mlx_losses[2]) > 1e-5 * plain[2]


def test_every_micro_batch_draws_its_own_masks_and_both_backends_agree():
    settings = ["train.grad_accum=2", "train.batch_size=8"]
    mlx_losses, mlx_state = _train("mlx", *settings, "train.gradient_checkpointing=true", steps=6)
    torch_losses, torch_state = _train("torch", *settings, steps=6)
    assert np.abs(mlx_losses - torch_losses).max() / np.abs(torch_losses).min() < 1e-5
    for name, value in torch_state.items():
        assert np.abs(mlx_state[name] - value).max() <= 1e-4 * np.abs(value).max(), name
    assert dropout_key(0, 0, 0) != dropout_key(0, 0, 1)
