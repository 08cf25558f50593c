"""NF4 with double quantization, byte for byte as bitsandbytes lays it out (QLoRA, Dettmers et al. 2023).

A weight of shape (out, in) is flattened row-major and cut into blocks of 64 values. Each block
is scaled by its absolute maximum and every value is replaced by the index of the nearest of
the 16 NF4 levels; two indices share a byte, the first in the high nibble. Double quantization
then stores the per-block absmax values as 8-bit codes of bitsandbytes' dynamic map, in blocks
of 256, after subtracting their mean.

Quantized once here, the same bytes go to both backends: bitsandbytes' Params4bit on torch and
our own NF4 layer on MLX. The 4-bit rounding follows bitsandbytes exactly (multiply by
1/absmax, nearest level, ties to the lower one) and so do the bytes. The 8-bit codes of double
quantization follow bitsandbytes' CPU quantizer (a 65536-entry lookup table, see
quantize_blockwise_8bit) byte for byte; its CUDA kernel binary-searches the map for the nearest level
instead, which differs for values within 1/65535 of a midpoint. One documented departure: the
absmax mean is exact, rounded once to float32, where bitsandbytes takes torch's float32 mean,
whose last bit depends on the CPU's vector width and thread count; the two are at most one ulp
apart. Dequantizing gives bitsandbytes' numbers bit for bit: tests/quant check all of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The 16 NF4 levels: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
_NF4_BOUNDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)

ABSMAX_BLOCKSIZE = 256


# bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, 256 sorted float32 levels) that
# double quantization codes the absmax values with. Written out rather than recomputed: its
# levels come from torch.linspace, whose float32 rounding numpy does not reproduce.
DYNAMIC_MAP = np.array([
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0,
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1,
], dtype=np.float32)


@dataclass
class NF4Tensor:
    """A weight in NF4: `packed` holds two 4-bit indices per byte (high nibble first).

    Without double quantization `absmax` holds one float32 per block of `blocksize` values.
    With it, `absmax` holds uint8 codes into DYNAMIC_MAP, scaled per block of 256 by
    `absmax_scale` and shifted by `absmax_offset`.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple[int, ...]
    blocksize: int = 64
    absmax_scale: np.ndarray | None = None
    absmax_offset: np.float32 | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.absmax_scale is None else self.absmax_scale.nbytes + 4
        return self.packed.nbytes + self.absmax.nbytes + extra


def quantize_nf4(weight: np.ndarray, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a float array to NF4, as `bitsandbytes.functional.quantize_4bit(quant_type="nf4")`.

    Example:
        >>> q = quantize_nf4(np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32))
        >>> q.packed.shape, q.absmax.dtype, dequantize_nf4(q).shape
        ((4096,), dtype('uint8'), (128, 64))
    """
    flat = np.asarray(weight, dtype=np.float32).reshape(-1)
    n = flat.size
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    inverse = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.clip(blocks * inverse[:, None], -1, 1).reshape(-1)
    if full < n:  # the last, short block divides rather than multiplying by the inverse
        tail_absmax = np.maximum(np.abs(flat[full:]).max(), np.float32(1e-38))
        absmax = np.concatenate([absmax, [tail_absmax]]).astype(np.float32)
        scaled = np.concatenate([scaled, np.clip(flat[full:] / tail_absmax, -1, 1)])
    if scaled.size % 2:
        scaled = np.concatenate([scaled, np.zeros(1, np.float32)])
    indices = np.searchsorted(_NF4_BOUNDS, scaled, side="left").astype(np.uint8)
    packed = (indices[0::2] << 4) | indices[1::2]
    q = NF4Tensor(packed=packed, absmax=absmax.astype(np.float32), shape=tuple(weight.shape), blocksize=blocksize)
    if double_quant:
        offset = mean_float32(q.absmax)
        codes, scales = quantize_blockwise_8bit(q.absmax - offset, ABSMAX_BLOCKSIZE)
        q.absmax, q.absmax_scale, q.absmax_offset = codes, scales, offset
    return q


def mean_float32(values: np.ndarray) -> np.float32:
    """The mean in float64, rounded once to float32.

    bitsandbytes takes torch's float32 mean, whose last bit depends on the CPU's vector width and
    thread count; an exact mean is the same everywhere and within one ulp of it.
    """
    return np.float32(values.astype(np.float64).mean())


_LOOKUP_SIZE = 65536


def _dynamic_map_lookup_table() -> np.ndarray:
    """For each of 65536 evenly spaced points of [-1, 1], the index of the nearest DYNAMIC_MAP level.

    bitsandbytes' CPU quantizer (0.50) looks codes up in this table rather than searching the map;
    the float32 steps below are its own, so the codes come out byte for byte the same.
    """
    midpoints = (np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])).astype(np.float32)
    steps = np.float32(2.0) * np.arange(_LOOKUP_SIZE, dtype=np.float32)
    points = (np.float32(-1.0) + steps / np.float32(_LOOKUP_SIZE - 1)).astype(np.float32)
    # a point takes the level past every midpoint strictly below it
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


def quantize_blockwise_8bit(values: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes into DYNAMIC_MAP, one absmax per block: bitsandbytes' CPU quantize_blockwise.

    A value is scaled by 1/absmax of its block, mapped to one of 65536 points of [-1, 1] and given
    that point's nearest level, which is within 1/65535 of the exact nearest level's midpoint.
    """
    values = np.asarray(values, np.float32).reshape(-1)
    n = values.size
    n_blocks = -(-n // blocksize)
    padded = np.zeros(n_blocks * blocksize, np.float32)
    padded[:n] = values
    block_absmax = np.abs(padded.reshape(n_blocks, blocksize)).max(axis=1)  # zero padding cannot win
    inverse = np.float32(1.0) / np.where(block_absmax == 0, np.float32(1.0), block_absmax)
    normed = np.clip(values * np.repeat(inverse, blocksize)[:n], -1, 1).astype(np.float32)
    half = ((normed + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    points = ((half * np.float32(_LOOKUP_SIZE - 1)).astype(np.float32) + np.float32(0.5)).astype(np.float32)
    codes = _DYNAMIC_MAP_LOOKUP[points.astype(np.int64)]
    codes[np.repeat(block_absmax == 0, blocksize)[:n]] = 0  # an all-zero block: bitsandbytes writes 0
    return codes, block_absmax.astype(np.float32)


_DYNAMIC_MAP_LOOKUP = _dynamic_map_lookup_table()


def nf4_absmax(q: NF4Tensor) -> np.ndarray:
    """The float32 absmax of every block (decoded first when double-quantized)."""
    if not q.double_quant:
        return q.absmax
    scales = np.repeat(q.absmax_scale, ABSMAX_BLOCKSIZE)[: q.absmax.size]
    return (DYNAMIC_MAP[q.absmax] * scales) + q.absmax_offset


def unpack_indices(q: NF4Tensor) -> np.ndarray:
    """The 4-bit level indices of every value, in row-major order (uint8)."""
    n = int(np.prod(q.shape))
    indices = np.empty(q.packed.size * 2, np.uint8)
    indices[0::2] = q.packed >> 4
    indices[1::2] = q.packed & 0x0F
    return indices[:n]


def dequantize_nf4(q: NF4Tensor, dtype: str = "float32") -> np.ndarray:
    """The float weights back: level × block absmax in float32, then rounded to `dtype`.

    Example:
        >>> w = np.ones((4, 64), np.float32)
        >>> float(dequantize_nf4(quantize_nf4(w, double_quant=False)).max())
        1.0
    """
    n = int(np.prod(q.shape))
    absmax = np.repeat(nf4_absmax(q), q.blocksize)[:n]
    values = (NF4_LEVELS[unpack_indices(q)] * absmax).reshape(q.shape)
    if dtype == "float32":
        return values
    if dtype == "bfloat16":
        return round_to_bfloat16(values)
    raise ValueError(f"unsupported dtype {dtype!r}")


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32 holding bf16 values."""
    bits = np.asarray(values, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded & np.uint32(0xFFFF0000)).view(np.float32)
