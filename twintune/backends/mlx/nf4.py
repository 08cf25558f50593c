"""NF4 linear layers in MLX: our own dequantize + matmul, with LoRA on top for QLoRA.

The layer holds the shared NF4 bytes (twintune/quant/nf4.py) and never a float copy of the
weight. Two paths compute the same maths:

- composed MLX ops (everywhere, and the reference): unpack the 4-bit indices, look up the NF4
  levels, scale by the block absmax, then one GEMM. On a CPU this beats a per-element kernel:
  the dequantize is linear in the weight size and the GEMM runs at BLAS speed.
- a Metal kernel (Apple GPUs, `mx.fast.metal_kernel`) that dequantizes on the fly inside the
  matmul, so the float weight is never written to memory.

The backward pass dequantizes again instead of keeping the float weight alive between the
forward and backward passes: that is what keeps a QLoRA step's memory near the 4-bit floor.
Gradients flow to the input only; the base weight is frozen.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from twintune.quant.nf4 import ABSMAX_BLOCKSIZE, DYNAMIC_MAP, NF4_LEVELS, NF4Tensor


# Each byte's two levels (high nibble first): one gather per byte instead of unpacking nibbles,
# about 1.4x faster on a CPU (benchmarks/nf4_layer_speed.py).
_BYTE_LEVELS = np.stack([NF4_LEVELS[np.arange(256) >> 4], NF4_LEVELS[np.arange(256) & 0x0F]], axis=1)


def dequantize(packed: mx.array, absmax: mx.array, shape: tuple[int, int], blocksize: int) -> mx.array:
    """float32 weights from packed NF4 indices and per-block float32 absmax (composed ops)."""
    n = shape[0] * shape[1]
    values = mx.array(_BYTE_LEVELS)[packed].reshape(-1)
    if n % blocksize == 0 and values.size == n:
        return (values.reshape(-1, blocksize) * absmax[:, None]).reshape(shape)
    return (values[:n] * mx.repeat(absmax, blocksize)[:n]).reshape(shape)


def decode_absmax(codes: mx.array, scales: mx.array, offset: mx.array) -> mx.array:
    """Double quantization undone: dynamic-map level × block scale + mean, in float32."""
    scale = mx.repeat(scales, ABSMAX_BLOCKSIZE)[: codes.size]
    return mx.array(DYNAMIC_MAP)[codes] * scale + offset


def metal_available() -> bool:
    return mx.metal.is_available()


_MATMUL_SOURCE = """
    // y[m, o] = sum_k x[m, k] * level(W[o, k]) * absmax[(o * K + k) / blocksize]
    uint o = thread_position_in_grid.x;
    uint m = thread_position_in_grid.y;
    uint K = x_shape[1];
    uint O = out_features;
    if (o >= O || m >= x_shape[0]) return;
    float acc = 0.0f;
    for (uint k = 0; k < K; k++) {
        uint flat = o * K + k;
        uint8_t byte = packed[flat / 2];
        uint idx = (flat % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
        acc += float(x[m * K + k]) * (levels[idx] * absmax[flat / blocksize]);
    }
    out[m * O + o] = acc;
"""


@functools.lru_cache(maxsize=None)
def _metal_matmul_kernel():
    return mx.fast.metal_kernel(
        name="twintune_nf4_matmul", input_names=["x", "packed", "absmax", "levels"],
        output_names=["out"], source=_MATMUL_SOURCE, header="", ensure_row_contiguous=True)


def nf4_matmul_metal(x2d: mx.array, packed: mx.array, absmax: mx.array, shape: tuple[int, int],
                     blocksize: int) -> mx.array:
    """x (M, K) @ W.T with W dequantized inside a Metal kernel (Apple GPUs only)."""
    out_features = shape[0]
    kernel = _metal_matmul_kernel()
    (y,) = kernel(
        inputs=[x2d.astype(mx.float32), packed, absmax, mx.array(NF4_LEVELS)],
        template=[("blocksize", blocksize), ("out_features", out_features)], grid=(out_features, x2d.shape[0], 1),
        threadgroup=(min(256, out_features), 1, 1), output_shapes=[(x2d.shape[0], out_features)],
        output_dtypes=[mx.float32])
    return y


@functools.lru_cache(maxsize=None)
def _nf4_matmul(shape: tuple[int, int], blocksize: int, use_metal: bool):
    """x @ W.T for one weight shape, with a backward that dequantizes again (nothing kept).

    The block absmax arrives as stored (8-bit codes, scales and mean with double quantization)
    and is decoded inside, so no decoded copy stays alive until the backward either.
    """

    def weight_absmax(absmax_parts):
        return decode_absmax(*absmax_parts) if len(absmax_parts) == 3 else absmax_parts[0]

    @mx.custom_function
    def matmul(x, packed, *absmax_parts):
        absmax = weight_absmax(absmax_parts)
        if use_metal:
            flat = x.reshape(-1, shape[1])
            y = nf4_matmul_metal(flat, packed, absmax, shape, blocksize).astype(x.dtype)
            return y.reshape(*x.shape[:-1], shape[0])
        return x @ dequantize(packed, absmax, shape, blocksize).astype(x.dtype).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, packed, *absmax_parts = primals
        dx = cotangent @ dequantize(packed, weight_absmax(absmax_parts), shape, blocksize).astype(cotangent.dtype)
        return (dx, mx.zeros_like(packed), *(mx.zeros_like(part) for part in absmax_parts))

    return matmul


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (bitsandbytes' layout), computing in its input's dtype
    (bitsandbytes' compute_dtype): the weight is dequantized in float32, then rounded to it."""

    def __init__(self, weight: NF4Tensor, bias: mx.array | None = None, use_metal: bool | None = None):
        super().__init__()
        self.packed = mx.array(weight.packed)
        self.absmax = mx.array(weight.absmax)
        if weight.double_quant:
            self.absmax_scale = mx.array(weight.absmax_scale)
            self.absmax_offset = mx.array(weight.absmax_offset)
        if bias is not None:
            self.bias = bias
        self.shape = tuple(weight.shape)
        self.blocksize = weight.blocksize
        self.double_quant = weight.double_quant
        self.use_metal = metal_available() if use_metal is None else use_metal
        self.freeze()

    def block_absmax(self) -> mx.array:
        if self.double_quant:
            return decode_absmax(self.absmax, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def dequantized_weight(self) -> mx.array:
        return dequantize(self.packed, self.block_absmax(), self.shape, self.blocksize)

    def __call__(self, x: mx.array) -> mx.array:
        stored = (self.absmax, self.absmax_scale, self.absmax_offset) if self.double_quant else (self.absmax,)
        y = _nf4_matmul(self.shape, self.blocksize, self.use_metal)(x, self.packed, *stored)
        return y + self.bias if "bias" in self else y
