"""LoReFT for torch: the module that fills a block's `intervention` slot (mirrors backends/mlx/methods/loreft.py)."""

from __future__ import annotations

import torch
from torch import nn

from twintune.backends.torch.dropout import dropout
from twintune.backends.torch.methods.registry import builds
from twintune.methods.loreft import LoReFTLayer


def orthonormal_rows(matrix: torch.Tensor) -> torch.Tensor:
    """The rows orthonormalised by modified Gram-Schmidt, in plain differentiable ops
    (twintune.methods.loreft.orthonormal_rows is the numpy reference; the docstring there says why)."""
    rows = []
    for i in range(matrix.shape[0]):
        v = matrix[i]
        for q in rows:
            v = v - (v @ q) * q
        rows.append(v / torch.sqrt(v @ v))
    return torch.stack(rows)


def position_masks(length: int, prompt_lengths: torch.Tensor | None, first: int, last: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks, (T, 1) and (B or 1, T, 1): a row's first `first` positions, and the last `last`
    of its prompt (a row without a prompt length is all prompt)."""
    position = torch.arange(length, device=device)[:, None]
    ends = length if prompt_lengths is None else prompt_lengths[:, None, None]
    return position < first, (position >= ends - last) & (position < ends)


class LoReFT(nn.Module):
    """One intervention: h + Rᵀ(W h + b − R h), R the orthonormalised `rotate_layer`, W and b
    `learned_source` (a Linear(d, r)); then dropout on the result, as pyreft's LoreftIntervention."""

    def __init__(self, r: int, d: int, dtype: torch.dtype, dropout: float, stream: int):
        super().__init__()
        self.rotate_layer = nn.Parameter(torch.empty(r, d, dtype=dtype, device="meta"))
        self.learned_source = nn.Linear(d, r, dtype=dtype, device="meta")
        self.dropout = dropout
        self.stream = stream

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        R = orthonormal_rows(self.rotate_layer)
        out = h + (self.learned_source(h) - h @ R.T) @ R
        return dropout(out, self.dropout, self.stream, self.training)


@builds(LoReFTLayer)
class LoReFTIntervention(LoReFT):
    """A block's output, intervened on at each row's first and last prompt positions: by this
    module's R, W, b at all of them, or (`separate_last`) by `last`'s at the last ones.

    It computes in its values' dtype (float32; float64 in a float64 run) whatever the model's, and
    casts back; positions it does not change come back as they were."""

    def __init__(self, values: dict[str, torch.Tensor], layer: LoReFTLayer, stream: int = 0):
        rotate_layer = values["rotate_layer"]
        r, d = rotate_layer.shape
        super().__init__(r, d, rotate_layer.dtype, layer.dropout, stream)
        self.first, self.last_positions = layer.first, layer.last
        self.separate_last = layer.separate_last
        if self.separate_last:
            self.last = LoReFT(r, d, rotate_layer.dtype, layer.dropout, (stream + 1) % 2**32)  # its own dropout masks

    def forward(self, x: torch.Tensor, prompt_lengths: torch.Tensor | None) -> torch.Tensor:
        h = x.to(self.rotate_layer.dtype)
        first, last = position_masks(x.shape[1], prompt_lengths, self.first, self.last_positions, x.device)
        if not self.separate_last:
            return torch.where(first | last, self.edit(h), h).to(x.dtype)
        h = torch.where(first, self.edit(h), h)
        return torch.where(last, self.last.edit(h), h).to(x.dtype)
