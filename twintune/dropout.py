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
layer's input keeps its value iff mix32(i ^ salt) >= threshold(p), with the kept values scaled by
1 / (1 - p), as torch's and MLX's own dropout do.

The index i is the element's place in the whole micro-batch, not in the tensor at hand
(`batch_index`): for an input of (rows, positions, ...) it is the row-major index the element
would have in the micro-batch's own padded layout. So a process that runs a share of the rows
(several processes: its first row and how much narrower its re-padded share is travel in the
scope, from the Batch) draws the bits one process draws for those rows, and the last block run at
a loss's rows only (`at_rows`: 2-D inputs, one row per (sequence, position), named in the scope by
`dropout_rows`) draws the bits of the whole block at those positions. Inputs that are not
batch-shaped (1-D, or 2-D outside `at_rows`: a prompt encoder's) use their own row-major index. `mix32` is Mueller's 32-bit
integer hash (xor-shift, multiply, twice): a bijection of 32-bit integers with good avalanche.
Its multiplier has 27 bits, so on torch (which has no unsigned 32-bit shifts) the products of
int64 tensors stay below 2**59 and `& MASK32` leaves the low 32 bits that uint32 arithmetic
wraps to on numpy and MLX: one formula, written once here, for all three.
"""

from __future__ import annotations

import dataclasses
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
        1121161859
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


def batch_index(row, position, column, first_row, width, inner):
    """The index hashed for element (row, position, column) of a batch-shaped input: its row-major
    place in the micro-batch's padded layout, `width` positions to a row and `inner` values to a
    position, rows counted from the share's `first_row`. Arrays broadcast; 32-bit wrap-around
    (uint32 on numpy and MLX; torch's int64 takes `& MASK32` after)."""
    return ((first_row + row) * width + position) * inner + column


def keep_mask(key: int, layer_name: str, shape: tuple[int, ...], p: float, first_row: int = 0,
              width_pad: int = 0, rows: tuple[np.ndarray, np.ndarray, int] | None = None) -> np.ndarray:
    """The reference mask in numpy: True where the element is kept (tests compare the backends with
    it). A batch-shaped input (3-D or more, or 2-D with `rows`: at_rows' (sequence, position, width))
    is indexed by `batch_index`, with the share's `first_row` and `width_pad` (DropoutScope).

    Example:
        >>> round(float(keep_mask(dropout_key(0, 0, 0), "lora", (4, 1000), 0.1).mean()), 2)
        0.9
    """
    u32 = np.uint32
    if len(shape) >= 3:
        B, S, inner = shape[0], shape[1], int(np.prod(shape[2:]))
        index = batch_index(np.arange(B, dtype=u32)[:, None, None], np.arange(S, dtype=u32)[None, :, None],
                            np.arange(inner, dtype=u32)[None, None, :], u32(first_row), u32(S + width_pad),
                            u32(inner)).reshape(shape)
    elif len(shape) == 2 and rows is not None:
        batch, position, width = rows
        index = batch_index(np.asarray(batch, u32)[:, None], np.asarray(position, u32)[:, None],
                            np.arange(shape[1], dtype=u32)[None, :], u32(first_row), u32(width + width_pad),
                            u32(shape[1]))
    else:
        index = np.arange(int(np.prod(shape)), dtype=u32).reshape(shape)
    salt = np.uint32(layer_salt(key, dropout_stream(layer_name)))
    return keep_bits(index, salt) >= np.uint32(keep_threshold(p))


@dataclasses.dataclass(frozen=True)
class DropoutScope:
    """What a dropout layer draws with: the micro-batch's key (the backend's 0-d array, an input of a
    compiled step rather than a constant), where the process's share of the micro-batch starts
    (`first_row`) and how much narrower its padding is than the micro-batch's (`width_pad`), both 0
    for one process, and inside at_rows the rows' (sequence, position, width)."""
    key: object
    first_row: object = 0
    width_pad: object = 0
    rows: tuple | None = None


_scopes: list[DropoutScope] = []  # innermost last


@contextmanager
def dropout_masks(key, first_row=0, width_pad=0):
    """Layers run inside draw their masks from `key`, for the share of the micro-batch that starts
    at `first_row` and is `width_pad` positions narrower (the backend's 0-d arrays or ints)."""
    with dropout_scope(DropoutScope(key, first_row, width_pad)):
        yield


@contextmanager
def dropout_scope(scope: DropoutScope):
    """Enter a scope again (a checkpointed block's recompute runs outside the forward's)."""
    _scopes.append(scope)
    try:
        yield
    finally:
        _scopes.pop()


@contextmanager
def dropout_rows(batch, position, width: int):
    """Inside, a 2-D input's rows are the positions (batch[n], position[n]) of sequences `width`
    positions wide (at_rows); outside any scope (evaluation), nothing changes."""
    scope = current_dropout_scope()
    if scope is None:
        yield
        return
    with dropout_scope(dataclasses.replace(scope, rows=(batch, position, width))):
        yield


def current_dropout_scope() -> DropoutScope | None:
    """The innermost scope, or None outside one."""
    return _scopes[-1] if _scopes else None


def current_dropout_key():
    """The key set by the innermost `dropout_masks`, or None outside one."""
    return _scopes[-1].key if _scopes else None


def active_dropout_scope(p: float, training: bool) -> DropoutScope | None:
    """The scope a dropout layer draws in, or None when it drops nothing (evaluation, p = 0).

    Training without a key set is a bug of the caller, not a reason to draw other masks: it raises.
    """
    if not training or p == 0:
        return None
    scope = current_dropout_scope()
    if scope is None:
        raise RuntimeError("dropout in training mode needs a key: run the forward pass inside dropout_masks(...)")
    return scope
