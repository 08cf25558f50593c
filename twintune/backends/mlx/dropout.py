"""Dropout in MLX with the shared counter-based masks (twintune/dropout.py): bit for bit torch's.

The backend names the micro-batch by setting its key around the forward pass (`twintune.dropout.dropout_masks`);
a layer with dropout calls `dropout(x, p, stream, training)` with its own stream. No random
state is consumed, so gradient checkpointing's recompute draws the same masks by construction.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from twintune.dropout import active_dropout_scope, batch_index, keep_bits, keep_threshold, layer_salt


@partial(mx.compile, shapeless=True)
def _masked(x: mx.array, row_start: mx.array, column: mx.array, salt: mx.array, threshold: mx.array,
            scale: mx.array) -> mx.array:
    # Compiled: the element index (row start + column, broadcast) and the hash's dozen integer ops
    # fuse into one pass over the elements, with no index array in memory. Shapeless, so the index
    # parts come in as arguments (an arange inside would keep its first size).
    bits = keep_bits(row_start + column, salt)
    return mx.where(bits >= threshold, x * scale, mx.array(0, dtype=x.dtype))


def _uint32(value) -> mx.array:
    return value.astype(mx.uint32) if isinstance(value, mx.array) else mx.array(value, dtype=mx.uint32)


def dropout(x: mx.array, p: float, stream: int, training: bool) -> mx.array:
    """x with the elements the shared generator drops for (current scope, stream) zeroed, the rest scaled by 1/(1-p)."""
    scope = active_dropout_scope(p, training)
    if scope is None:
        return x
    threshold = mx.array(keep_threshold(p), dtype=mx.uint32)
    scale = mx.array(1 / (1 - p), dtype=x.dtype)
    salt = layer_salt(scope.key, stream)
    first_row, width_pad = _uint32(scope.first_row), _uint32(scope.width_pad)
    arange = partial(mx.arange, dtype=mx.uint32)
    if x.ndim >= 3:  # index as twintune/dropout.py's keep_mask: the element's place in the micro-batch
        B, S = x.shape[:2]
        inner = x.size // (B * S) if x.size else 1
        row_start = batch_index(arange(B).reshape(-1, 1, 1), arange(S).reshape(1, -1, 1), 0, first_row,
                                S + width_pad, _uint32(inner))
        return _masked(x.reshape(B, S, inner), row_start, arange(inner), salt, threshold, scale).reshape(x.shape)
    if x.ndim == 2 and scope.rows is not None:
        batch, position, width = scope.rows
        row_start = batch_index(_uint32(batch).reshape(-1, 1), _uint32(position).reshape(-1, 1), 0, first_row,
                                width + width_pad, _uint32(x.shape[1]))
        return _masked(x, row_start, arange(x.shape[1]), salt, threshold, scale)
    width = x.shape[-1]
    row_start = (arange(x.size // width) * width).reshape(*x.shape[:-1], 1)
    return _masked(x, row_start, arange(width), salt, threshold, scale)
