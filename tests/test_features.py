"""A frozen model's sentence features: the same on both backends, and transformers' hidden states."""

import numpy as np
import pytest
import torch

from model_helpers import hf_model
from twintune.data.batching import eval_batches, make_batch
from twintune.recipe import load_recipe
from twintune.train.loop import prepare

DEMO = "recipes/demo-financial-sentiment.yaml"


@pytest.fixture(scope="module")
def runs():
    return {backend: prepare(load_recipe(DEMO), backend) for backend in ("mlx", "torch")}


def _features(run, pooling):
    batches = eval_batches(run.splits["validation"][:24], 8)
    return np.concatenate([run.backend.features(batch, pooling) for batch in batches])


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_both_backends_give_the_same_features(runs, pooling):
    mlx, torch_ = (_features(runs[b], pooling) for b in ("mlx", "torch"))
    assert mlx.shape == torch_.shape == (24, runs["torch"].spec.hidden_size)
    assert np.abs(mlx - torch_).max() <= 1e-5 * np.abs(torch_).max()


def test_features_are_transformers_last_hidden_states_over_the_prompt(runs):
    run = runs["torch"]
    model = hf_model(run.model_dir).transformer
    encoded = run.splits["validation"][:6]
    last, mean = _features_of(run, encoded)
    for row, example in enumerate(encoded):
        ids = torch.from_numpy(example.ids[: example.prompt_len][None].astype(np.int64))
        with torch.no_grad():
            hidden = model(ids).last_hidden_state[0].numpy()  # after ln_f, as ours
        assert np.allclose(last[row], hidden[-1], atol=1e-5 * np.abs(hidden).max())
        assert np.allclose(mean[row], hidden.mean(axis=0), atol=1e-5 * np.abs(hidden).max())


def _features_of(run, encoded):
    """Features in the examples' order (make_batch keeps it; eval_batches sorts by length)."""
    batch = make_batch(encoded)
    return run.backend.features(batch, "last"), run.backend.features(batch, "mean")


def test_an_unknown_pooling_is_one_sentence(runs):
    from twintune.errors import TwintuneError

    with pytest.raises(TwintuneError, match=r"pooling must be last or mean, got 'max'"):
        make_batch(runs["torch"].splits["validation"][:2]).pooling_weights("max")
