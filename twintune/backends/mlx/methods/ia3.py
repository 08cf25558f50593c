"""IA3 for MLX: a learned vector scales the layer's output, or (feed-forward layers) its input."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from twintune.backends.mlx.methods.registry import builds
from twintune.methods.ia3 import IA3Layer


@builds(IA3Layer)
class IA3Linear(nn.Module):
    """y = base(x) * l (l of shape (out, 1), bias scaled too), or y = base(x * l) for a
    feed-forward layer (l of shape (1, in)), as PEFT's IA3. The product is taken in the vector's
    dtype (float32; float64 in float64), then cast back to the model's."""

    def __init__(self, base_layer: nn.Module, values: dict[str, mx.array], layer: IA3Layer, stream: int = 0):
        super().__init__()
        self.base_layer = base_layer
        self.ia3_l = values["ia3_l"]
        self.feedforward = layer.feedforward

    def __call__(self, x: mx.array) -> mx.array:
        scaling = self.ia3_l.reshape(-1)
        if self.feedforward:
            return self.base_layer((x.astype(scaling.dtype) * scaling).astype(x.dtype))
        out = self.base_layer(x)
        return (out.astype(scaling.dtype) * scaling).astype(out.dtype)
