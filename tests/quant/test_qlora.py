"""NF4 layers with LoRA on both backends, the quantize recipe options, and what a QLoRA run saves."""

import numpy as np
import pytest
import torch

from twintune.errors import TwintuneError
from twintune.quant.nf4 import dequantize_nf4, quantize_nf4
from twintune.recipe import load_recipe
from twintune.train.loop import prepare, train_step

mx = pytest.importorskip("mlx.core")
pytest.importorskip("bitsandbytes")

from twintune.backends.mlx.nf4 import NF4Linear, metal_available  # noqa: E402
from twintune.backends.torch.nf4 import nf4_linear  # noqa: E402


@pytest.fixture(scope="module")
def layer_case():
    rng = np.random.default_rng(3)
    weight = (rng.normal(size=(96, 80)) * 0.05).astype(np.float32)
    bias = rng.normal(size=96).astype(np.float32)
    x = rng.normal(size=(2, 5, 80)).astype(np.float32)
    dy = rng.normal(size=(2, 5, 96)).astype(np.float32)
    return quantize_nf4(weight), bias, x, dy


def test_mlx_nf4_layer_forward_and_input_gradient(layer_case):
    q, bias, x, dy = layer_case
    w = dequantize_nf4(q)
    layer = NF4Linear(q, mx.array(bias), use_metal=False)
    y, vjp = mx.vjp(lambda inp: layer(inp), [mx.array(x)], [mx.array(dy)])
    np.testing.assert_allclose(np.array(y[0]), x @ w.T + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(vjp[0]), dy @ w, rtol=1e-5, atol=1e-5)
    assert not layer.trainable_parameters()  # the 4-bit base is frozen


def test_torch_bitsandbytes_layer_matches_mlx_layer(layer_case):
    q, bias, x, dy = layer_case
    torch_layer = nf4_linear(q, torch.from_numpy(bias))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch_layer(xt)
    yt.backward(torch.from_numpy(dy))
    mlx_layer = NF4Linear(q, mx.array(bias), use_metal=False)
    y, vjp = mx.vjp(lambda inp: mlx_layer(inp), [mx.array(x)], [mx.array(dy)])
    np.testing.assert_allclose(np.array(y[0]), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(vjp[0]), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not metal_available(), reason="the Metal kernel needs an Apple GPU")
def test_metal_kernel_matches_composed_ops(layer_case):
    q, bias, x, dy = layer_case
    composed = NF4Linear(q, mx.array(bias), use_metal=False)
    metal = NF4Linear(q, mx.array(bias), use_metal=True)
    np.testing.assert_allclose(np.array(metal(mx.array(x))), np.array(composed(mx.array(x))), rtol=1e-5, atol=1e-5)
    grad_composed = mx.grad(lambda inp: (composed(inp) * mx.array(dy)).sum())(mx.array(x))
    grad_metal = mx.grad(lambda inp: (metal(inp) * mx.array(dy)).sum())(mx.array(x))
    np.testing.assert_allclose(np.array(grad_metal), np.array(grad_composed), rtol=1e-5, atol=1e-5)


def _recipe(*overrides):
    return load_recipe("recipes/demo-financial-sentiment.yaml",
                       ["train.max_steps=6", "data.synthetic_size=120", *overrides])


@pytest.mark.parametrize("overrides", [
    ["quantize.type=affine", "quantize.bits=4", "quantize.group_size=32"],
    ["quantize.type=affine", "quantize.bits=8", "quantize.group_size=64"],
    ["quantize.type=nf4", "quantize.double_quant=false"],
])
def test_other_quantize_options_train_on_mlx(overrides):
    run = prepare(_recipe(*overrides), "mlx")
    losses = [train_step(run, step)["loss"] for step in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all("lora_" in name for name in run.backend.trainable_state())


def test_affine_is_refused_on_torch_with_a_sentence():
    with pytest.raises(TwintuneError, match="affine.*mlx backend only.*nf4"):
        prepare(_recipe("quantize.type=affine"), "torch")


@pytest.mark.parametrize("item, words", [
    ("quantize.type=int3", "quantize.type"),
    ("quantize.bits=3", "quantize.bits"),
    ("quantize.group_size=48", "quantize.group_size"),
    ("quantize.blocksize=100", "quantize.blocksize"),
    ("quantize.double_quant=maybe", "quantize.double_quant"),
    ("quantize.typ=nf4", "did you mean 'quantize.type'"),
])
def test_bad_quantize_values_are_refused_by_name(item, words):
    with pytest.raises(TwintuneError, match=words.replace(".", r"\.")):
        load_recipe("recipes/demo-financial-sentiment.yaml", [item])


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_qlora_adapter_is_a_plain_lora_adapter_and_merges_into_a_float_base(backend, tmp_path):
    """Trained on NF4, the adapter loads on the float base; merging dequantizes, then adds B A."""
    run = prepare(_recipe("quantize.type=nf4"), backend)
    for step in range(6):
        train_step(run, step)
    adapter = run.backend.trainable_state()
    plain = prepare(_recipe(), backend)
    assert set(adapter) == set(plain.backend.trainable_state())

    # The QLoRA model's logits equal a float model whose weights are dequantized NF4 + scale * B A.
    from twintune.formats.checkpoint import load_checkpoint
    from twintune.models import GPTNeoSpec, gpt_neo_weights
    from twintune.quant import Quantization, quantize_linear_layers

    checkpoint = load_checkpoint(run.recipe.model)
    spec = GPTNeoSpec.from_config(checkpoint.config)
    weights = gpt_neo_weights(spec, checkpoint.weights)
    quantized = quantize_linear_layers(weights, list(spec.linear_layers()), Quantization("nf4"))
    merged = run.method.merge(weights, adapter, quantized)
    merged_backend = type(run.backend)(spec, merged, seed=0)
    ids = run.splits["validation"][0].ids[None, :]
    np.testing.assert_allclose(merged_backend.logits(ids), run.backend.logits(ids), rtol=1e-4, atol=1e-4)
