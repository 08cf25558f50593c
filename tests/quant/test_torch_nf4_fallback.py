"""The torch backend's NF4 fallback, on any CPU: this machine made to look like an AVX-512F CPU running
bitsandbytes 0.50's CPU kernel, whose AVX-512 path misreads layers whose quantization blocks straddle rows
(see test_nf4.avx512_path_misreads). The check nf4_linear makes at build time then sees that kernel's
result, and must replace exactly those layers with our NF4Linear, say so once per model, and leave the
model computing what the MLX backend computes.
"""

import warnings

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from test_nf4 import avx512_path_misreads, emulate_avx512_path  # the predicate and the pinned cause, once
from torch.nn import functional as F

from twintune.backends.torch import nf4 as torch_nf4
from twintune.backends.torch.nf4 import NF4Linear, nf4_linear
from twintune.formats.tiny_model import write_tiny_model
from twintune.quant.nf4 import dequantize_nf4, quantize_nf4
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

CAUSE = "AVX-512 path assumes quantization blocks never straddle rows"


@pytest.fixture
def avx512_cpu(monkeypatch):
    """bitsandbytes' dequantization as the AVX-512 path computes it, for the check nf4_linear makes."""
    real = torch_nf4.bitsandbytes_dequantize

    def dequantize_as_on_avx512(weight, dtype=torch.float32, device="cpu"):
        if avx512_path_misreads(weight.shape, weight.blocksize):
            return emulate_avx512_path(weight, dtype).to(device)
        return real(weight, dtype, device)

    monkeypatch.setattr(torch_nf4, "bitsandbytes_dequantize", dequantize_as_on_avx512)
    monkeypatch.setattr(torch_nf4, "_cpu_has_avx512f", lambda: True)


LAYER_CASES = [((128, 96), 64), ((3, 32), 64), ((4, 80), 64), ((5, 48), 32),  # blocks straddle rows
               ((96, 128), 64), ((1, 96), 64), ((10, 100), 64), ((64, 64), 64)]  # they do not


@pytest.mark.parametrize("shape, blocksize", LAYER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_check_replaces_exactly_the_misread_layers_with_an_exact_linear(avx512_cpu, shape, blocksize, dtype):
    rng = np.random.default_rng(sum(shape) + blocksize)
    q = quantize_nf4((rng.normal(size=shape) * 0.05).astype(np.float32), blocksize=blocksize)
    bias = torch.from_numpy(rng.normal(size=shape[0]).astype(np.float32)).to(dtype)
    layer = nf4_linear(q, bias, dtype)
    if not avx512_path_misreads(shape, blocksize):
        assert isinstance(layer, bnb.nn.Linear4bit)
        return
    assert isinstance(layer, NF4Linear) and CAUSE in layer.bitsandbytes_mismatch

    # forward: F.linear with numpy's dequantized weight, bit for bit; backward: that linear's input gradient
    weight = torch.from_numpy(dequantize_nf4(q)).to(dtype)
    x = torch.from_numpy(rng.normal(size=(2, 3, shape[1])).astype(np.float32)).to(dtype)
    dy = torch.from_numpy(rng.normal(size=(2, 3, shape[0])).astype(np.float32)).to(dtype)
    xt, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, expected = layer(xt), F.linear(xr, weight, bias)
    y.backward(dy)
    expected.backward(dy)
    assert torch.equal(y, expected)
    assert torch.equal(xt.grad, xr.grad)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.fixture(scope="module")
def straddling_model_dir(tmp_path_factory):
    """A tiny GPT-Neo 96 wide: blocks of 64 straddle the rows of q/k/v/out_proj (96, 96) and c_fc
    (256, 96), not those of c_proj (96, 256)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-96") / "model", hidden_size=96, intermediate_size=256)


def _qlora_run(model_dir, backend):
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml",
                         [f"model={model_dir}", "quantize.type=nf4", "train.max_steps=4", "data.synthetic_size=120"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = prepare(recipe, backend)
    said = [str(w.message) for w in caught if "bitsandbytes dequantizes NF4 layers" in str(w.message)]
    return run, said


def test_a_model_with_misread_layers_warns_once_and_computes_what_mlx_computes(avx512_cpu, straddling_model_dir):
    run, said = _qlora_run(straddling_model_dir, "torch")
    assert len(said) == 1, said
    assert "of shape (96, 96), (256, 96) wrongly" in said[0] and CAUSE in said[0] and "(96, 256)" not in said[0]
    assert "twintune's own NF4 dequantization" in said[0]
    base_layers = [m.base_layer for m in run.backend.model.modules() if hasattr(m, "base_layer")]
    assert {layer.shape for layer in base_layers if isinstance(layer, NF4Linear)} == {(96, 96), (256, 96)}
    assert sum(isinstance(layer, bnb.nn.Linear4bit) for layer in base_layers) == 4  # c_proj, one per block

    mlx_run, mlx_said = _qlora_run(straddling_model_dir, "mlx")
    assert not mlx_said
    # logits as the float32 logits parity requires (tests/parity/test_logits_parity.py)
    ids = run.splits["validation"][0].ids[None, :]
    torch_logits, mlx_logits = run.backend.logits(ids), mlx_run.backend.logits(ids)
    assert np.abs(mlx_logits - torch_logits).max() / np.abs(torch_logits).max() < 1e-4
    # and QLoRA training through the NF4Linear backward: per-step losses as the NF4 training parity requires
    # (tests/parity/test_training_parity.py)
    torch_losses = np.array([train_step(run, step)["loss"] for step in range(4)])
    mlx_losses = np.array([train_step(mlx_run, step)["loss"] for step in range(4)])
    assert (np.abs(mlx_losses - torch_losses) / np.abs(torch_losses)).max() < 1e-3
    assert any(np.abs(v).max() > 0 for k, v in run.backend.trainable_state().items() if "lora_B" in k)
