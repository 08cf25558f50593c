"""Dropout in PyTorch with the shared counter-based masks (twintune/dropout.py): bit for bit MLX's.

The backend names the micro-batch by setting its key around the forward and backward passes
(`twintune.dropout.dropout_masks`); a layer with dropout calls `dropout(x, p, stream, training)` with its own
stream. No random state is consumed, so gradient checkpointing's recompute and a compiled
graph draw the same masks as the eager step. torch has no unsigned 32-bit shifts, so the hash
runs on int64 tensors holding 32-bit values (twintune/dropout.py says why that is exact).
"""

from __future__ import annotations

import torch

from twintune.dropout import current_dropout_key, keep_bits, keep_threshold, layer_salt


def dropout(x: torch.Tensor, p: float, stream: int, training: bool) -> torch.Tensor:
    """x with the elements the shared generator drops for (current key, stream) zeroed, the rest scaled by 1/(1-p)."""
    if not training or p == 0:
        return x
    key = current_dropout_key()
    if key is None:
        raise RuntimeError("dropout in training mode needs a key: run the forward pass inside dropout_masks(...)")
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    keep = keep_bits(index, layer_salt(key, stream)) >= keep_threshold(p)
    return torch.where(keep, x * (1 / (1 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
