"""twintune/optimizers.py's updates on MLX arrays: the ArrayOps they compute with, each trainable
value's state, and the step on one value (the mirror of backends/torch/optimizer.py).

Every optimizer, AdamW included, runs its written-once `update` here; an elementwise one (all but
Adafactor) on the flattened value, as torch's chunks see it; an 8-bit one on a large value in chunks
too (its temporaries are several times the value: without them, 7 GB at the 125M shape).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from twintune.optimizers import BLOCK, Optimizer, compensated_update, state_pieces


class MLXArrayOps:
    """twintune/optimizers.py's ArrayOps on MLX arrays."""

    def __init__(self):
        self.tables: dict[bytes, mx.array] = {}

    sqrt, sign, abs, where = staticmethod(mx.sqrt), staticmethod(mx.sign), staticmethod(mx.abs), staticmethod(mx.where)

    @staticmethod
    def clamp_min(x: mx.array, low: float) -> mx.array:
        return mx.maximum(x, low)

    @staticmethod
    def mean(x: mx.array, axis: int) -> mx.array:
        return mx.mean(x, axis=axis)

    @staticmethod
    def amax(x: mx.array, axis: int) -> mx.array:
        return mx.max(x, axis=axis)

    @staticmethod
    def rms(x: mx.array) -> mx.array:
        return mx.sqrt(mx.sum(x * x)) / math.sqrt(x.size)

    @staticmethod
    def blocks(x: mx.array) -> mx.array:
        return mx.pad(x, (0, -x.shape[0] % BLOCK)).reshape(-1, BLOCK)

    @staticmethod
    def unblock(x: mx.array, size: int) -> mx.array:
        return x.reshape(-1)[:size]

    def table(self, values: np.ndarray) -> mx.array:
        key = values.tobytes()
        if key not in self.tables:
            self.tables[key] = mx.array(values)
        return self.tables[key]

    @staticmethod
    def take(table: mx.array, indices: mx.array) -> mx.array:
        return mx.take(table, indices.astype(mx.int32))

    @staticmethod
    def bits(x: mx.array) -> mx.array:
        return x.view(mx.int32)

    @staticmethod
    def as_codes(indices: mx.array) -> mx.array:
        return indices.astype(mx.uint8)

    @staticmethod
    def float32(x: mx.array) -> mx.array:
        return x.astype(mx.float32)

    @staticmethod
    def like(x: mx.array, other: mx.array) -> mx.array:
        return x.astype(other.dtype)


CHUNK = 2**22  # values per piece of a large 8-bit update


def state_dtype(kind: str, value: mx.array) -> mx.Dtype:
    """A state array's dtype: "float" is the run's precise dtype (float32 beside a bfloat16 value),
    "value" the value's own."""
    return {"float32": mx.float32, "codes": mx.uint8, "value": value.dtype,
            "float": mx.float64 if value.dtype == mx.float64 else mx.float32}[kind]


def low_precision(value: mx.array) -> bool:
    """A trainable value held in bfloat16: full fine-tuning of a bfloat16 model (compensated_update)."""
    return value.dtype == mx.bfloat16


def new_state(optimizer: Optimizer, value: mx.array) -> dict[str, mx.array]:
    """Zeros of each state array the optimizer keeps for `value`."""
    return {key: mx.zeros(spec.shape, dtype=state_dtype(spec.kind, value))
            for key, spec in optimizer.value_states(tuple(value.shape), low_precision(value)).items()}


def update_value(optimizer: Optimizer, ops: MLXArrayOps, p: mx.array, g: mx.array, state: dict, step: int, lr: float,
                 weight_decay: float, chunk: int = CHUNK) -> tuple[mx.array, dict]:
    """(the new value, its new state) after one step of `optimizer` on value `p` with gradient `g`. An
    8-bit update of a large value runs `chunk` values at a time, each evaluated before the next: its
    temporaries (the dequantized moments, the code indices) are several times the value's size."""
    if not optimizer.elementwise:
        return compensated_update(optimizer, ops, p, g, state, step, lr, weight_decay)
    size, flat_p, flat_g = p.size, p.reshape(-1), g.reshape(-1)
    flat = {key: value.reshape(-1) for key, value in state.items()}
    if not optimizer.eight_bit or size <= chunk:
        new_p, new = compensated_update(optimizer, ops, flat_p, flat_g, flat, step, lr, weight_decay)
        return new_p.reshape(p.shape), {key: value.reshape(state[key].shape) for key, value in new.items()}
    values, states = [], {key: [] for key in state}
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        pieces = state_pieces(flat, size, start, stop)
        new_p, new = compensated_update(optimizer, ops, flat_p[start:stop], flat_g[start:stop], pieces, step, lr,
                                        weight_decay)
        mx.eval(new_p, new)
        values.append(new_p)
        for key, value in new.items():
            states[key].append(value)
    new_p = mx.concatenate(values).reshape(p.shape)
    new = {key: mx.concatenate(parts).reshape(state[key].shape) for key, parts in states.items()}
    mx.eval(new_p, new)
    return new_p, new
