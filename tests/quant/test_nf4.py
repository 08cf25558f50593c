"""Our numpy NF4 quantizer against bitsandbytes, and our dequantizations (numpy, MLX, composed
torch ops) against both of bitsandbytes' dequantization paths:

- "generic": bitsandbytes' pure-torch reference, `bitsandbytes.backends.default.ops._dequantize_4bit_compute`
  (what its CPU op runs for odd widths). Ours equal it for every shape on every CPU.
- "native": `bitsandbytes.functional.dequantize_4bit`, i.e. its CPU op, which runs the C kernel
  `dequantizeBlockwise4bitCpu` for even widths. Ours equal it wherever that kernel is right; where it
  is known wrong (`native_is_known_wrong`), its result is pinned to the cause and `nf4_linear` must
  have chosen our NF4Linear.

test_torch_nf4_fallback.py imports the predicate and the emulation from here.
"""

import bitsandbytes.functional as bnb_functional
import mlx.core as mx
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from twintune.backends.mlx.nf4 import NF4Linear as MLXNF4Linear
from twintune.backends.torch import nf4 as torch_nf4
from twintune.backends.torch.nf4 import NF4Linear, bitsandbytes_dequantize, dequantize, nf4_linear, quant_state
from twintune.quant.nf4 import (
    DYNAMIC_MAP, NF4_LEVELS, dequantize_nf4, nf4_absmax, quantize_blockwise_8bit, quantize_nf4, round_to_bfloat16,
    unpack_indices,
)

# Several sizes that are not a multiple of 64 (a short last block) or even odd (a padded nibble).
SHAPES = [(64, 64), (128, 96), (33, 17), (7, 9), (1, 63), (300, 1000), (2048, 257)]

# (shape, blocksize) for the dequantization paths: widths a multiple of 16 whose blocks straddle rows
# (the native kernel's AVX-512 path misreads them), and ones where it does not (one row, a width that is a
# multiple of the blocksize, or a width it leaves to its scalar path), plus the shapes above.
DEQUANT_CASES = [
    ((128, 96), 64), ((3, 32), 64), ((128, 160), 64), ((4, 80), 64), ((5, 48), 32),
    ((1, 96), 64), ((96, 128), 64), ((64, 64), 64), ((10, 100), 64), ((300, 1000), 64), ((6, 64), 32),
    ((33, 17), 64), ((7, 9), 64), ((1, 63), 64), ((2048, 257), 64),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MLX_DTYPES = {torch.float32: mx.float32, torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}

HAS_AVX512F = torch_nf4._cpu_has_avx512f()  # bitsandbytes' own probe (lib.has_avx512f_cpu)


def avx512_path_misreads(shape, blocksize):
    """Whether bitsandbytes 0.50's CPU kernel, on its AVX-512 path, scales this layer by wrong absmax values.

    `dequantizeBlockwise4bitCpu` takes a vector path when the CPU has AVX-512F, the width n is a multiple
    of 16 and blocksize >= 16. That path looks each weight's absmax up as absmax[row * (n // blocksize) +
    col // blocksize], as if every row started a new quantization block. bitsandbytes quantizes the
    flattened weight, so when n is not a multiple of the blocksize and there is more than one row,
    blocks straddle rows and every weight after the first row's last full block gets another block's
    absmax. Elsewhere (no AVX-512F, or n % 16 != 0) a scalar path over the flat index is right.
    (bitsandbytes' op also sends blocksize >= 2048 to its generic path on AVX-512; the cases here
    use 32 and 64.)
    """
    rows, n = shape
    return n % 16 == 0 and blocksize >= 16 and rows > 1 and n % blocksize != 0


def native_is_known_wrong(shape, blocksize):
    return HAS_AVX512F and avx512_path_misreads(shape, blocksize)


def emulate_avx512_path(q, dtype=torch.float32):
    """The native kernel's AVX-512 path in numpy: row-based absmax indexing (the cause, pinned), the
    float32 product, rounded once to `dtype` (to nearest even, as its bf16/fp16 stores do)."""
    rows, n = q.shape
    block = np.arange(rows)[:, None] * (n // q.blocksize) + np.arange(n)[None, :] // q.blocksize
    values = NF4_LEVELS[unpack_indices(q)].reshape(q.shape) * nf4_absmax(q)[block]
    return torch.from_numpy(values.astype(np.float32)).to(dtype)


def generic_dequantize(q, dtype=torch.float32):
    """bitsandbytes' "generic" path: its pure-torch `_dequantize_4bit_compute`, the 8-bit absmax decoded
    first by bitsandbytes as `dequantize_4bit` does."""
    state = quant_state(q, dtype)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_functional.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute(torch.from_numpy(q.packed.copy()), absmax, code, q.blocksize, q.shape, dtype)


def our_weight(q, dtype=torch.float32):
    """numpy's dequantize_nf4 in float32, rounded once to `dtype`."""
    return torch.from_numpy(dequantize_nf4(q)).to(dtype)


def assert_native_result(q, native, dtype):
    """The "native" path's result: ours, except where the kernel is known wrong, where it is ours (a
    fixed bitsandbytes) or exactly the AVX-512 path's misreading."""
    if native_is_known_wrong(q.shape, q.blocksize):
        assert torch.equal(native, our_weight(q, dtype)) or torch.equal(native, emulate_avx512_path(q, dtype))
    else:
        assert torch.equal(native, our_weight(q, dtype))


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
    # and bitsandbytes' own round trip (its "native" path) is ours, in float32 and bfloat16, except
    # where its kernel is known wrong (pinned there)
    assert_native_result(ours, bnb_functional.dequantize_4bit(packed, state), torch.float32)
    state.dtype = torch.bfloat16
    assert_native_result(ours, bnb_functional.dequantize_4bit(packed, state), torch.bfloat16)
    # numpy's own bfloat16 rounding is torch's
    assert torch.equal(torch.from_numpy(dequantize_nf4(ours, "bfloat16")), our_weight(ours, torch.bfloat16).float())


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


def _case(shape, blocksize, double_quant):
    weights = _weights(shape, seed=7 + sum(shape) + blocksize)
    return quantize_nf4(weights, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize("shape, blocksize", DEQUANT_CASES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_numpy_mlx_and_torch_dequantize_equal_bitsandbytes_generic_path(shape, blocksize, double_quant):
    """On every CPU, for every shape: numpy, MLX and composed torch ops give bitsandbytes' generic
    path's weights bit for bit, in float32 and rounded once to bfloat16 and float16."""
    q = _case(shape, blocksize, double_quant)
    mlx_weight = MLXNF4Linear(q, use_metal=False).dequantized_weight()
    torch_weight = NF4Linear(q, None).dequantized_weight()
    absmax = torch.from_numpy(nf4_absmax(q))
    assert torch.equal(dequantize(torch.from_numpy(q.packed), absmax, q.shape, q.blocksize), torch_weight)
    for dtype in DTYPES:
        generic = generic_dequantize(q, dtype)
        assert generic.dtype == dtype and generic.shape == shape
        assert torch.equal(our_weight(q, dtype), generic)  # numpy
        assert torch.equal(torch_weight.to(dtype), generic)
        mlx_rounded = np.array(mlx_weight.astype(MLX_DTYPES[dtype]).astype(mx.float32))
        assert np.array_equal(mlx_rounded, generic.float().numpy())
    assert np.array_equal(dequantize_nf4(q, "bfloat16"), generic_dequantize(q, torch.bfloat16).float().numpy())


@pytest.mark.parametrize("shape, blocksize", DEQUANT_CASES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitsandbytes_native_path_is_ours_or_the_known_avx512_misreading(shape, blocksize, double_quant, dtype):
    """bitsandbytes' native path equals ours wherever its kernel is right; where it is known wrong it is
    ours (fixed) or the pinned misreading. Either way nf4_linear's one check at build caught exactly the
    disagreement: Linear4bit where bitsandbytes gives our weights, our NF4Linear where it does not."""
    q = _case(shape, blocksize, double_quant)
    native = bitsandbytes_dequantize(q, dtype)
    assert native.dtype == dtype and native.shape == shape
    assert_native_result(q, native, dtype)
    agrees = torch.equal(native, our_weight(q, dtype))
    layer = nf4_linear(q, None, dtype)
    assert isinstance(layer, NF4Linear) is not agrees
    if not agrees:  # then it is the known misreading (asserted above), and the layer says so
        assert "AVX-512" in layer.bitsandbytes_mismatch


@pytest.mark.parametrize("shape, blocksize", [case for case in DEQUANT_CASES if case[0][1] % 16 == 0])
def test_the_avx512_emulation_misreads_exactly_where_blocks_straddle_rows(shape, blocksize):
    """The pinned cause is sound on any CPU: row-based absmax indexing gives our weights where every row
    starts a block, and other weights exactly where `avx512_path_misreads` says."""
    q = _case(shape, blocksize, double_quant=True)
    assert torch.equal(emulate_avx512_path(q), our_weight(q)) is not avx512_path_misreads(shape, blocksize)
