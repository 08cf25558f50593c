"""Dropout in MLX with the shared counter-based masks (twintune/dropout.py): bit for bit torch's.

The backend names the micro-batch by setting its key around the forward pass (`twintune.dropout.dropout_masks`);
a layer with dropout calls `dropout(x, p, stream, training)` with its own stream. No random
state is consumed, so gradient checkpointing's recompute draws the same masks by construction.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from twintune.dropout import active_dropout_key, keep_bits, keep_threshold, layer_salt


@partial(mx.compile, shapeless=True)
def _masked(x: mx.array, row_start: mx.array, column: mx.array, salt: mx.array, threshold: mx.array,
            scale: mx.array) -> mx.array:
    # Compiled: the element index (row start + column, broadcast) and the hash's dozen integer ops
    # fuse into one pass over the elements, with no index array in memory. Shapeless, so the index
    # parts come in as arguments (an arange inside would keep its first size).
    bits = keep_bits(row_start + column, salt)
    return mx.where(bits >= threshold, x * scale, mx.array(0, dtype=x.dtype))


def dropout(x: mx.array, p: float, stream: int, training: bool) -> mx.array:
    """x with the elements the shared generator drops for (current key, stream) zeroed, the rest scaled by 1/(1-p)."""
    key = active_dropout_key(p, training)
    if key is None:
        return x
    threshold = mx.array(keep_threshold(p), dtype=mx.uint32)
    width = x.shape[-1]
    row_start = (mx.arange(x.size // width, dtype=mx.uint32) * width).reshape(*x.shape[:-1], 1)
    column = mx.arange(width, dtype=mx.uint32)
    return _masked(x, row_start, column, layer_salt(key, stream), threshold, mx.array(1 / (1 - p), dtype=x.dtype))
