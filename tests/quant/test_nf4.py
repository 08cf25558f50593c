"""Our numpy NF4 quantizer against bitsandbytes, and MLX's dequantize against bitsandbytes'."""

import numpy as np
import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from twintune.quant.nf4 import (  # noqa: E402
    DYNAMIC_MAP, NF4_LEVELS, dequantize_nf4, quantize_blockwise_8bit, quantize_nf4, round_to_bfloat16,
)

# Several sizes that are not a multiple of 64 (a short last block) or even odd (a padded nibble).
SHAPES = [(64, 64), (128, 96), (33, 17), (7, 9), (1, 63), (300, 1000), (2048, 257)]


def _weights(shape, seed, scale=0.02):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _bnb_quantize(w, double_quant):
    return bnb_functional.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                        compress_statistics=double_quant)


def test_tables_are_bitsandbytes_tables():
    assert np.array_equal(NF4_LEVELS, bnb_functional.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(DYNAMIC_MAP, bnb_functional.create_dynamic_map().numpy())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.02, 1.0])
def test_nf4_bytes_and_absmax_identical_to_bitsandbytes(shape, scale):
    w = _weights(shape, seed=sum(shape), scale=scale)
    packed, state = _bnb_quantize(w, double_quant=False)
    ours = quantize_nf4(w, double_quant=False)
    assert np.array_equal(ours.packed, packed.numpy().reshape(-1))
    assert np.array_equal(ours.absmax, state.absmax.numpy())
    # and bitsandbytes' own round trip equals ours, in float32 and bfloat16
    assert np.array_equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state).numpy())
    state.dtype = torch.bfloat16
    bf16 = bnb_functional.dequantize_4bit(packed, state).float().numpy()
    assert np.array_equal(dequantize_nf4(ours, "bfloat16"), bf16)


def test_bfloat16_weights_quantize_like_bitsandbytes():
    w = round_to_bfloat16(_weights((96, 128), seed=5))
    packed, state = bnb_functional.quantize_4bit(torch.from_numpy(w).bfloat16(), blocksize=64, quant_type="nf4")
    ours = quantize_nf4(w, double_quant=False)
    assert np.array_equal(ours.packed, packed.numpy().reshape(-1))
    assert np.array_equal(ours.absmax, state.absmax.numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantization_matches_bitsandbytes(shape):
    """Identical bytes, scales and 8-bit codes; the absmax mean at most one ulp from torch's (quant/nf4.py)."""
    w = _weights(shape, seed=sum(shape))
    packed, state = _bnb_quantize(w, double_quant=True)
    ours = quantize_nf4(w, double_quant=True)
    assert np.array_equal(ours.packed, packed.numpy().reshape(-1))
    bnb_offset = np.float32(state.offset.item())
    assert abs(int(ours.absmax_offset.view(np.int32)) - int(bnb_offset.view(np.int32))) <= 1
    # Given bitsandbytes' mean, every byte of the nested state is bitsandbytes' own.
    raw = quantize_nf4(w, double_quant=False).absmax
    codes, scales = quantize_blockwise_8bit(raw - bnb_offset, 256)
    assert np.array_equal(codes, state.absmax.numpy())
    assert np.array_equal(scales, state.state2.absmax.numpy())
    if ours.absmax_offset == bnb_offset:
        assert np.array_equal(ours.absmax, state.absmax.numpy())
        assert np.array_equal(ours.absmax_scale, state.state2.absmax.numpy())


@pytest.mark.parametrize("scale", [1e-3, 0.3, 7.0])
def test_blockwise_8bit_codes_identical_to_bitsandbytes(scale):
    """Many values, so that bitsandbytes' lookup table decides codes next to every midpoint."""
    values = (np.random.default_rng(3).normal(size=300_001) * scale).astype(np.float32)
    values[:256] = 0.0  # an all-zero block
    bnb_codes, bnb_state = bnb_functional.quantize_blockwise(torch.from_numpy(values), blocksize=256)
    codes, scales = quantize_blockwise_8bit(values, 256)
    assert np.array_equal(scales, bnb_state.absmax.numpy())
    assert np.array_equal(codes, bnb_codes.numpy())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_is_bit_identical_on_numpy_mlx_and_bitsandbytes(shape, double_quant):
    mx = pytest.importorskip("mlx.core")
    from twintune.backends.mlx.nf4 import NF4Linear
    from twintune.backends.torch.nf4 import dequantize as bnb_dequantize

    ours = quantize_nf4(_weights(shape, seed=7 + sum(shape)), double_quant=double_quant)
    reference = bnb_dequantize(ours, torch.float32).numpy()
    assert np.array_equal(dequantize_nf4(ours), reference)
    mlx_weight = NF4Linear(ours, use_metal=False).dequantized_weight()
    assert np.array_equal(np.array(mlx_weight), reference)
    reference_bf16 = bnb_dequantize(ours, torch.bfloat16).float().numpy()
    assert np.array_equal(np.array(mlx_weight.astype(mx.bfloat16).astype(mx.float32)), reference_bf16)
    assert np.array_equal(dequantize_nf4(ours, "bfloat16"), reference_bf16)
