"""IA3 for torch: a learned vector scales the layer's output, or (feed-forward layers) its input."""

from __future__ import annotations

import torch
from torch import nn
from twintune.backends.torch.methods.registry import builds
from twintune.methods.ia3 import IA3Layer


@builds(IA3Layer)
class IA3Linear(nn.Module):
    """y = base(x) * l (l of shape (out, 1), bias scaled too), or y = base(x * l) for a
    feed-forward layer (l of shape (1, in)), as PEFT's IA3. The product is taken in the vector's
    dtype (float32; float64 in float64), then cast back to the model's."""

    def __init__(self, base_layer: nn.Module, values: dict[str, torch.Tensor], layer: IA3Layer, stream: int = 0):
        super().__init__()
        l = values["ia3_l"]
        self.base_layer = base_layer
        self.ia3_l = nn.Parameter(torch.empty(l.shape, dtype=l.dtype, device="meta"))
        self.feedforward = layer.feedforward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaling = self.ia3_l.reshape(-1)
        if self.feedforward:
            return self.base_layer((x.to(scaling.dtype) * scaling).to(x.dtype))
        out = self.base_layer(x)
        return (out.to(scaling.dtype) * scaling).to(out.dtype)
