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

from twintune.dropout import MASK32, active_dropout_scope, batch_index, keep_bits, keep_threshold, layer_salt


def _keep_mask(x: torch.Tensor, salt: torch.Tensor, threshold: int, first_row: torch.Tensor,
               width_pad: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor] | None = None,
               width: int = 0) -> torch.Tensor:
    """True where the element of x is kept; its index as twintune/dropout.py's `keep_mask` makes it."""
    def arange(n):
        return torch.arange(n, dtype=torch.int64, device=x.device)

    if x.dim() >= 3:
        B, S = x.shape[0], x.shape[1]
        inner = x.numel() // (B * S) if x.numel() else 1
        index = batch_index(arange(B).view(-1, 1, 1), arange(S).view(1, -1, 1), arange(inner).view(1, 1, -1),
                            first_row, S + width_pad, inner).reshape(x.shape)
    elif x.dim() == 2 and rows is not None:
        batch, position = rows
        index = batch_index(batch.to(torch.int64).view(-1, 1), position.to(torch.int64).view(-1, 1),
                            arange(x.shape[1]).view(1, -1), first_row, width + width_pad, x.shape[1])
    else:
        index = arange(x.numel()).view(x.shape)
    return keep_bits(index & MASK32, salt) >= threshold


_compiled_keep_mask = None  # built on first use: importing this module compiles nothing


def keep_mask(x: torch.Tensor, salt: torch.Tensor, threshold: int, *layout) -> torch.Tensor:
    """`_keep_mask`, compiled once per process (dynamic shapes: one graph for every batch shape)."""
    global _compiled_keep_mask
    if _compiled_keep_mask is None:
        _compiled_keep_mask = torch.compile(_keep_mask, dynamic=True)
    if _compiled_keep_mask is not _keep_mask:
        try:
            return _compiled_keep_mask(x, salt, threshold, *layout)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager ops give the same bits
            warnings.warn(f"torch.compile is unavailable here ({type(error).__name__}); dropout masks use eager "
                          "torch ops (the same masks, slower).", stacklevel=2)
            _compiled_keep_mask = _keep_mask
    return _keep_mask(x, salt, threshold, *layout)


def _as_tensor(value, device: torch.device) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.int64, device=device)


def dropout(x: torch.Tensor, p: float, stream: int, training: bool) -> torch.Tensor:
    """x with the elements the shared generator drops for (current scope, stream) zeroed, the rest scaled by 1/(1-p)."""
    scope = active_dropout_scope(p, training)
    if scope is None:
        return x
    layout = [_as_tensor(scope.first_row, x.device), _as_tensor(scope.width_pad, x.device)]
    if scope.rows is not None and x.dim() == 2:
        batch, position, width = scope.rows
        layout += [(batch, position), width]
    keep = keep_mask(x.detach(), layer_salt(scope.key, stream), keep_threshold(p), *layout)
    return torch.where(keep, x * (1 / (1 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
