"""Shared batching: dynamic right padding, loss only on label tokens, same order every time."""

import numpy as np
import pytest

from twintune.data.batching import Encoder, Prompt, TrainOrder, eval_batches, make_batch
from twintune.errors import TwintuneError
from twintune.formats.checkpoint import load_tokenizer
from twintune.recipe import DEFAULT_LABELS


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return Encoder(load_tokenizer(tiny_dir), Prompt("Sentence: {text}\nSentiment:", dict(DEFAULT_LABELS)), max_length=64)


def test_dynamic_padding_and_label_positions(encoder):
    short = encoder.encode("Profit rose .", "positive")
    long = encoder.encode("Operating profit of Nordic Steel rose by 12.4 % to EUR 31.2 mn in the third quarter .", "negative")
    batch = make_batch([short, long])
    assert batch.input_ids.shape == (2, len(long.ids))  # padded to the longest, not a fixed length
    assert batch.n_real_tokens == len(short.ids) + len(long.ids)
    flat = batch.input_ids.reshape(-1)
    # Each target is the token right after its position, and it is the label word.
    assert np.array_equal(flat[batch.target_positions + 1], batch.targets)
    assert list(batch.targets) == [encoder.first_label_ids[2], encoder.first_label_ids[0]]
    assert np.array_equal(batch.answer_positions, batch.target_positions)
    pad_positions = set(range(len(short.ids), batch.input_ids.shape[1]))
    assert not pad_positions & set(batch.target_positions.tolist())


def test_train_order_is_seeded_and_addressable(encoder):
    encoded = [encoder.encode(f"Sales rose {i} % .", "positive") for i in range(10)]
    a = TrainOrder(encoded, batch_size=3, grad_accum=2, seed=1)
    b = TrainOrder(encoded, batch_size=3, grad_accum=2, seed=1)
    assert a.steps_per_epoch == 2
    for step in range(5):
        for x, y in zip(a.step_batches(step), b.step_batches(step)):
            assert np.array_equal(x.input_ids, y.input_ids)
    first_epoch = np.concatenate([bt.input_ids[:, :8] for s in range(2) for bt in a.step_batches(s)])
    assert len(first_epoch) == 10  # every example once per epoch
    assert not np.array_equal(a.step_batches(0)[0].input_ids, a.step_batches(2)[0].input_ids)


def test_eval_batches_cover_every_example_once(encoder):
    encoded = [encoder.encode("x " * (i % 7) + "sales rose .", "positive") for i in range(11)]
    seen = np.concatenate([b.example_index for b in eval_batches(encoded, 4)])
    assert sorted(seen.tolist()) == list(range(11))


def test_bad_examples_named(encoder, tiny_dir):
    with pytest.raises(TwintuneError, match="'bullish'"):
        encoder.encode("Profit rose .", "bullish")
    with pytest.raises(TwintuneError, match="longer than data.max_length"):
        encoder.encode("word " * 100, "neutral", " #3 of the train split")
    with pytest.raises(TwintuneError, match="different tokens"):
        Encoder(load_tokenizer(tiny_dir), Prompt("{text}", {"a": " positive", "b": " positive"}), 64)
    with pytest.raises(TwintuneError, match="{text}"):
        Prompt("no placeholder", {"a": " x"})


def test_group_by_length_covers_each_example_once_and_pads_less(encoder):
    rng = np.random.default_rng(0)
    encoded = [encoder.encode("Sales rose ." + " in the quarter" * int(k), "positive") for k in rng.integers(0, 12, 200)]
    plain = TrainOrder(encoded, batch_size=8, grad_accum=1, seed=3)
    grouped = TrainOrder(encoded, batch_size=8, grad_accum=1, seed=3, group_by_length=True)
    for epoch in range(2):
        assert sorted(grouped.epoch_order(epoch).tolist()) == list(range(200))
    assert not np.array_equal(grouped.epoch_order(0), grouped.epoch_order(1))

    def padded(order):
        return sum(b.input_ids.size for s in range(order.steps_per_epoch) for b in order.step_batches(s))

    real = sum(len(e.ids) for e in encoded)
    assert padded(grouped) - real < 0.25 * (padded(plain) - real)
