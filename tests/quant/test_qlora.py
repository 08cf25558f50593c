"""NF4 layers with LoRA on both backends, the quantize recipe options, and what a QLoRA run saves."""

import bitsandbytes as bnb
import mlx.core as mx
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from twintune.backends.mlx.nf4 import NF4Linear, metal_available
from twintune.backends.torch import nf4 as torch_nf4
from twintune.backends.torch.nf4 import nf4_linear
from twintune.errors import TwintuneError
from twintune.quant.nf4 import dequantize_nf4, quantize_nf4
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step


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


def test_torch_nf4_layer_matches_mlx_layer(layer_case):
    """Whichever layer nf4_linear chose (bitsandbytes' Linear4bit, or our NF4Linear where bitsandbytes'
    kernel is wrong: 80 wide, blocks of 64 straddle rows), it computes what the MLX layer computes."""
    q, bias, x, dy = layer_case
    torch_layer = nf4_linear(q, torch.from_numpy(bias))
    assert isinstance(torch_layer, (bnb.nn.Linear4bit, torch_nf4.NF4Linear))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch_layer(xt)
    yt.backward(torch.from_numpy(dy))
    mlx_layer = NF4Linear(q, mx.array(bias), use_metal=False)
    y, vjp = mx.vjp(lambda inp: mlx_layer(inp), [mx.array(x)], [mx.array(dy)])
    np.testing.assert_allclose(np.array(y[0]), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(vjp[0]), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_torch_nf4_layer_is_a_linear_with_the_dequantized_weight(layer_case, dtype):
    """Our torch NF4Linear: the forward is F.linear with numpy's dequantized weight (rounded once to the
    dtype) bit for bit, and the backward gives that linear's input gradient, to the input only."""
    q, bias, x, dy = layer_case
    layer = torch_nf4.NF4Linear(q, torch.from_numpy(bias), compute_dtype=dtype)
    weight = torch.from_numpy(dequantize_nf4(q)).to(dtype)
    assert not any(p.requires_grad for p in layer.parameters())  # the 4-bit base is frozen
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    y = layer(xt)
    y.backward(torch.from_numpy(dy).to(dtype))
    xr = torch.from_numpy(x).to(dtype).requires_grad_(True)
    expected = F.linear(xr, weight, torch.from_numpy(bias).to(dtype))
    expected.backward(torch.from_numpy(dy).to(dtype))
    assert y.dtype == dtype and torch.equal(y, expected)
    assert xt.grad.dtype == dtype and torch.equal(xt.grad, xr.grad)
    assert torch.equal(layer.dequantized_weight(), torch.from_numpy(dequantize_nf4(q)))


def test_float64_compute_is_our_nf4_layer_with_the_exact_weight(layer_case):
    """bitsandbytes cannot compute in float64: nf4_linear returns our NF4Linear, whose weight is the
    float32 dequantization widened exactly, with nothing wrong to report about bitsandbytes."""
    q, bias, x, _ = layer_case
    layer = nf4_linear(q, torch.from_numpy(bias), compute_dtype=torch.float64)
    assert isinstance(layer, torch_nf4.NF4Linear) and layer.bitsandbytes_mismatch is None
    assert layer.bias.dtype == torch.float64
    exact = dequantize_nf4(q).astype(np.float64)
    assert np.array_equal(layer.dequantized_weight().double().numpy(), exact)
    x64 = torch.from_numpy(x).double()
    assert torch.equal(layer(x64), F.linear(x64, torch.from_numpy(exact), torch.from_numpy(bias).double()))


def test_bitsandbytes_layers_never_switch_to_their_bfloat16_cpu_kernel(layer_case):
    """On CPUs with AVX512-BF16, Linear4bit would repack itself at its first no-grad forward in eval
    mode for a kernel that computes in bfloat16 whatever the compute dtype; ours turn that off."""
    _, bias, _, _ = layer_case
    square = quantize_nf4(np.random.default_rng(4).normal(size=(64, 64)).astype(np.float32))
    layer = nf4_linear(square, torch.from_numpy(bias[:64]))
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.support_avx512bf16_for_cpu is False
    layer.eval()
    with torch.no_grad():
        layer(torch.ones(2, 64))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # still bitsandbytes' layout


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
    from twintune.methods import BaseModel

    merged = run.method.merge(BaseModel(spec, weights, quantized), adapter)
    merged_backend = type(run.backend)(spec, merged)
    ids = run.splits["validation"][0].ids[None, :]
    np.testing.assert_allclose(merged_backend.logits(ids), run.backend.logits(ids), rtol=1e-4, atol=1e-4)
