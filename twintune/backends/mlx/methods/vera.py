"""VeRA for MLX: a frozen base linear plus lambda_b * B (lambda_d * A dropout(x)), named as PEFT names it;
A and B are this layer's slices of the shared frozen projections."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from twintune.backends.mlx.dropout import dropout
from twintune.backends.mlx.methods.registry import builds
from twintune.methods.vera import VeRALayer


@builds(VeRALayer)
class VeRALinear(nn.Module):
    """The adapter computes in its own dtype (float32, or float64 in a float64 run), as LoRA's does;
    the projections are frozen members in that dtype."""

    def __init__(self, base_layer: nn.Module, values: dict[str, mx.array], layer: VeRALayer, stream: int = 0):
        super().__init__()
        self.base_layer = base_layer
        self.vera_lambda_b = values["vera_lambda_b"]
        self.vera_lambda_d = values["vera_lambda_d"]
        self.vera_A = mx.array(layer.vera_A, dtype=self.vera_lambda_d.dtype)
        self.vera_B = mx.array(layer.vera_B, dtype=self.vera_lambda_d.dtype)
        self.freeze(recurse=False, keys=["vera_A", "vera_B"])
        self.dropout = layer.dropout
        self.stream = stream

    def __call__(self, x: mx.array) -> mx.array:
        h = dropout(x.astype(self.vera_lambda_d.dtype), self.dropout, self.stream, self.training)
        update = self.vera_lambda_b * ((self.vera_lambda_d * (h @ self.vera_A.T)) @ self.vera_B.T)
        return self.base_layer(x) + update.astype(x.dtype)
