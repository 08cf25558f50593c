"""Dropout masks that both backends draw bit for bit alike: one counter-based generator.

Each element's keep/drop decision is a pure function of (recipe seed, optimizer step,
micro-batch, layer, element index), computed with the same 32-bit integer operations on
numpy, MLX and torch arrays. Nothing is drawn from a framework's random stream, so:

- MLX and torch drop the same elements (the parity tests compare runs with dropout bit for bit);
- gradient checkpointing's recompute, a compiled step, a resumed run and every micro-batch of
  gradient accumulation draw exactly the masks the plain, uninterrupted run draws;
- a method that adds dropout (any layer) calls `keep_mask` with its own layer name.

The generator: `key` (a 32-bit int) names one micro-batch of one step; each layer mixes its
`stream` (a checksum of its name) into the key on the device, giving a `salt`; element i of the
layer's input (row-major) keeps its value iff mix32(i ^ salt) >= threshold(p), with the kept
values scaled by 1 / (1 - p), as torch's and MLX's own dropout do. `mix32` is Mueller's 32-bit
integer hash (xor-shift, multiply, twice): a bijection of 32-bit integers with good avalanche.
Its multiplier has 27 bits, so on torch (which has no unsigned 32-bit shifts) the products of
int64 tensors stay below 2**59 and `& MASK32` leaves the low 32 bits that uint32 arithmetic
wraps to on numpy and MLX: one formula, written once here, for all three.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import numpy as np

MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B


def mix32(x):
    """Mueller's 32-bit hash on an int, a uint32 numpy/MLX array or an int64 torch tensor of 32-bit values.

    Example:
        >>> mix32(0), mix32(1)
        (0, 824515495)
    """
    x = (((x >> 16) ^ x) * _MULTIPLIER) & MASK32
    x = (((x >> 16) ^ x) * _MULTIPLIER) & MASK32
    return (x >> 16) ^ x


def dropout_key(seed: int, step: int, micro_batch: int) -> int:
    """The 32-bit key of one micro-batch of one optimizer step (0-based both).

    Example:
        >>> dropout_key(0, 0, 0) != dropout_key(0, 1, 0) != dropout_key(0, 0, 1)
        True
    """
    return mix32(mix32(mix32(seed & MASK32) ^ (step & MASK32)) ^ (micro_batch & MASK32))


def dropout_stream(layer_name: str) -> int:
    """A layer's stream: the CRC-32 of its name, the same in every process and on every backend.

    Example:
        >>> dropout_stream("transformer.h.0.attn.attention.q_proj")
        2016419532
    """
    return zlib.crc32(layer_name.encode())


def layer_salt(key, stream: int):
    """The key mixed with a layer's stream (key may be an int or a 0-d array of either backend)."""
    return mix32(key ^ mix32(stream))


def keep_threshold(p: float) -> int:
    """Elements whose 32-bit hash is at least this are kept: probability 1 - p within 2**-33."""
    return min(MASK32, round(p * 2**32))


def keep_bits(index, salt):
    """The 32-bit hash of each element index under a layer's salt (same shape as `index`)."""
    return mix32(index ^ salt)


def keep_mask(key: int, layer_name: str, shape: tuple[int, ...], p: float) -> np.ndarray:
    """The reference mask in numpy: True where the element is kept (tests compare the backends with it).

    Example:
        >>> keep_mask(dropout_key(0, 0, 0), "lora", (4, 1000), 0.1).mean().round(2)
        0.9
    """
    index = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
    salt = np.uint32(layer_salt(key, dropout_stream(layer_name)))
    return keep_bits(index, salt) >= np.uint32(keep_threshold(p))


_keys: list = []  # the current micro-batch's key as the backend's 0-d array, innermost last


@contextmanager
def dropout_masks(key):
    """Layers run inside draw their masks from `key`: the backend's 0-d array (MLX uint32, torch
    int64) of `dropout_key(...)`, an input of a compiled step rather than a constant."""
    _keys.append(key)
    try:
        yield
    finally:
        _keys.pop()


def current_dropout_key():
    """The key set by the innermost `dropout_masks`, or None outside one."""
    return _keys[-1] if _keys else None


def active_dropout_key(p: float, training: bool):
    """The key a dropout layer draws with, or None when it drops nothing (evaluation, p = 0).

    Training without a key set is a bug of the caller, not a reason to draw other masks: it raises.
    """
    if not training or p == 0:
        return None
    key = current_dropout_key()
    if key is None:
        raise RuntimeError("dropout in training mode needs a key: run the forward pass inside dropout_masks(...)")
    return key
