"""Dropout in PyTorch with the shared counter-based masks (twintune/dropout.py): bit for bit MLX's.

The backend names the micro-batch by setting its key around the forward and backward passes
(`twintune.dropout.dropout_masks`); a layer with dropout calls `dropout(x, p, stream, training)`
with its own stream. No random state is consumed, so gradient checkpointing's recompute and a
compiled graph draw the same masks as the eager step. torch has no unsigned 32-bit shifts, so the
hash runs on int64 tensors holding 32-bit values (twintune/dropout.py says why that is exact).

The mask is computed by a compiled function (torch.compile): eager torch runs the hash's dozen
integer ops as a dozen passes over int64 tensors, 40 ms per (16, 64, 768) mask on a 2-core CPU
against 1 ms compiled and 10 ms for torch's own dropout (benchmarks/dropout_cost.py). Integer
operations are exact, so compiled and eager masks are the same bits; where compiling is not
possible (no C++ compiler, say), the eager function is used, with one warning.
"""

from __future__ import annotations

import warnings

import torch

from twintune.dropout import active_dropout_key, keep_bits, keep_threshold, layer_salt


def _keep_mask(x: torch.Tensor, salt: torch.Tensor, threshold: int) -> torch.Tensor:
    """True where the element of x (row-major index) is kept."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
    return keep_bits(index, salt) >= threshold


_compiled_keep_mask = None  # built on first use: importing this module compiles nothing


def keep_mask(x: torch.Tensor, salt: torch.Tensor, threshold: int) -> torch.Tensor:
    """`_keep_mask`, compiled once per process (dynamic shapes: one graph for every batch shape)."""
    global _compiled_keep_mask
    if _compiled_keep_mask is None:
        _compiled_keep_mask = torch.compile(_keep_mask, dynamic=True)
    if _compiled_keep_mask is not _keep_mask:
        try:
            return _compiled_keep_mask(x, salt, threshold)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager ops give the same bits
            warnings.warn(f"torch.compile is unavailable here ({type(error).__name__}); dropout masks use eager "
                          "torch ops (the same masks, slower).", stacklevel=2)
            _compiled_keep_mask = _keep_mask
    return _keep_mask(x, salt, threshold)


def dropout(x: torch.Tensor, p: float, stream: int, training: bool) -> torch.Tensor:
    """x with the elements the shared generator drops for (current key, stream) zeroed, the rest scaled by 1/(1-p)."""
    key = active_dropout_key(p, training)
    if key is None:
        return x
    keep = keep_mask(x.detach(), layer_salt(key, stream), keep_threshold(p))
    return torch.where(keep, x * (1 / (1 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
