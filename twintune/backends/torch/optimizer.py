"""twintune/optimizers.py's updates on torch tensors: the ArrayOps they compute with, each trainable
value's state, and a step that walks a large value in chunks (the mirror of backends/mlx/optimizer.py).

AdamW keeps its fused in-place path (backend.py `adamw_update_`, the same bits as the written-once
formula); every other optimizer runs its written-once `update` here. An elementwise optimizer (all
but Adafactor) updates a value CHUNK elements at a time, so its temporaries stay a few MB whatever
the value's size (GPT-Neo 1.3B's embedding is 103M values), and the 8-bit state's blocks never
straddle a chunk (CHUNK is a multiple of BLOCK).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from twintune.optimizers import BLOCK, Optimizer, compensated_update, state_pieces

CHUNK = 2**20  # elements per piece of an elementwise update


class TorchArrayOps:
    """twintune/optimizers.py's ArrayOps on torch tensors of one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tables: dict[bytes, torch.Tensor] = {}

    sqrt, sign, abs = staticmethod(torch.sqrt), staticmethod(torch.sign), staticmethod(torch.abs)
    where = staticmethod(torch.where)

    @staticmethod
    def clamp_min(x: torch.Tensor, low: float) -> torch.Tensor:
        return torch.clamp(x, min=low)

    @staticmethod
    def mean(x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.mean(dim=axis)

    @staticmethod
    def amax(x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.amax(dim=axis)

    @staticmethod
    def rms(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x) / math.sqrt(x.numel())

    @staticmethod
    def blocks(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, -x.shape[0] % BLOCK)).view(-1, BLOCK)

    @staticmethod
    def unblock(x: torch.Tensor, size: int) -> torch.Tensor:
        return x.reshape(-1)[:size]

    def table(self, values: np.ndarray) -> torch.Tensor:
        key = values.tobytes()
        if key not in self.tables:
            self.tables[key] = torch.from_numpy(values).to(self.device)
        return self.tables[key]

    @staticmethod
    def take(table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if indices.dtype == torch.uint8:  # (as an index, uint8 would select as a mask)
            indices = indices.int()
        return table.index_select(0, indices.reshape(-1)).reshape(indices.shape)

    @staticmethod
    def bits(x: torch.Tensor) -> torch.Tensor:
        return x.view(torch.int32)

    @staticmethod
    def as_codes(indices: torch.Tensor) -> torch.Tensor:
        return indices.to(torch.uint8)

    @staticmethod
    def float32(x: torch.Tensor) -> torch.Tensor:
        return x.float()

    @staticmethod
    def like(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return x.to(other.dtype)


def state_dtype(kind: str, value: torch.Tensor) -> torch.dtype:
    """A state array's dtype: "float" is the run's precise dtype (float32 beside a bfloat16 value),
    "value" the value's own."""
    return {"float32": torch.float32, "codes": torch.uint8, "value": value.dtype,
            "float": torch.promote_types(value.dtype, torch.float32)}[kind]


def low_precision(value: torch.Tensor) -> bool:
    """A trainable value held in bfloat16: full fine-tuning of a bfloat16 model (compensated_update)."""
    return value.dtype == torch.bfloat16


def new_state(optimizer: Optimizer, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zeros of each state array the optimizer keeps for `value` (paged optimizers' in CUDA's paged
    memory, through bitsandbytes)."""
    state = {}
    for key, spec in optimizer.value_states(tuple(value.shape), low_precision(value)).items():
        dtype = state_dtype(spec.kind, value)
        if optimizer.paged:
            import bitsandbytes.functional as bnb_functional

            state[key] = bnb_functional.get_paged(*spec.shape, dtype=dtype, device=value.device)
            state[key].zero_()
        else:
            state[key] = torch.zeros(spec.shape, dtype=dtype, device=value.device)
    return state


@torch.no_grad()
def update_value(optimizer: Optimizer, ops: TorchArrayOps, p: torch.Tensor, g: torch.Tensor, state: dict, step: int,
                 lr: float, weight_decay: float, grad_factor: float = 1.0, chunk: int = CHUNK) -> None:
    """One step of `optimizer` on value `p` (in place), its gradient times `grad_factor` (unscaling
    and clipping), its state arrays written in place."""
    g = g * grad_factor if grad_factor != 1.0 else g
    if not optimizer.elementwise:
        new_p, new = compensated_update(optimizer, ops, p, g, state, step, lr, weight_decay)
        p.copy_(new_p)
        for key, value in new.items():
            state[key].copy_(value)
        return
    size = p.numel()
    flat_p, flat_g = p.view(-1), g.reshape(-1)
    flat_state = {key: value.view(-1) for key, value in state.items()}
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        pieces = state_pieces(flat_state, size, start, stop)
        new_p, new = compensated_update(optimizer, ops, flat_p[start:stop], flat_g[start:stop], pieces, step, lr,
                                        weight_decay)
        flat_p[start:stop] = new_p
        for key, value in new.items():
            pieces[key].copy_(value)
