"""MLX vs our torch backend vs transformers' reference: the same logits in float32."""

import numpy as np
import pytest
import torch

from twintune.backends.mlx.backend import MLXBackend
from twintune.backends.torch.backend import TorchBackend
from twintune.formats.checkpoint import load_checkpoint
from twintune.models import GPTNeoSpec, gpt_neo_weights


def _reference_logits(model_dir, ids):
    from transformers import GPTNeoForCausalLM

    model = GPTNeoForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


@pytest.mark.parametrize("fixture,length", [("tiny_window_dir", 40), ("tiny_dir", 300)])
def test_logits_agree_on_sequences_longer_than_the_local_window(request, fixture, length):
    model_dir = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(str(model_dir))
    spec = GPTNeoSpec.from_config(ckpt.config)
    assert length > spec.window_size  # local layers really cut attention off
    weights = gpt_neo_weights(spec, ckpt.weights)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, length)).astype(np.int32)

    mlx_logits = MLXBackend(spec, weights).logits(ids)
    torch_logits = TorchBackend(spec, weights).logits(ids)
    reference = _reference_logits(model_dir, ids)

    scale = np.abs(reference).max()
    assert np.abs(mlx_logits - reference).max() / scale < 1e-4
    assert np.abs(torch_logits - reference).max() / scale < 1e-5
    assert np.abs(mlx_logits - torch_logits).max() / scale < 1e-4


def test_local_window_changes_logits(tiny_window_dir):
    """Guard against a window that is silently ignored: a global-only model differs."""
    ckpt = load_checkpoint(str(tiny_window_dir))
    spec = GPTNeoSpec.from_config(ckpt.config)
    weights = gpt_neo_weights(spec, ckpt.weights)
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (1, 40)).astype(np.int32)
    windowed = MLXBackend(spec, weights).logits(ids)
    import dataclasses

    global_only = dataclasses.replace(spec, attention_layers=("global",) * spec.num_layers)
    unwindowed = MLXBackend(global_only, weights).logits(ids)
    assert np.allclose(windowed[:, :8], unwindowed[:, :8], atol=1e-5)
    assert np.abs(windowed[:, 20:] - unwindowed[:, 20:]).max() > 1e-3
