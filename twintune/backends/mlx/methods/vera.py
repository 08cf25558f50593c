"""VeRA for MLX: a frozen base linear plus lambda_b * B (lambda_d * A dropout(x)), named as PEFT names it;
A and B are this layer's slices of the shared frozen projections."""

from __future__ import annotations

import weakref

import mlx.core as mx
import mlx.nn as nn

from twintune.backends.mlx.dropout import dropout
from twintune.backends.mlx.methods.registry import builds
from twintune.methods.vera import Projections, VeRALayer


_CONVERTED: "weakref.WeakKeyDictionary[Projections, dict]" = weakref.WeakKeyDictionary()


def shared_projections(projections: Projections, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """A plan's projections as arrays, made once per dtype and shared by its layers."""
    held = _CONVERTED.setdefault(projections, {})
    if dtype not in held:
        held[dtype] = tuple(mx.array(array, dtype=dtype) for array in (projections.vera_A, projections.vera_B))
    return held[dtype]


@builds(VeRALayer)
class VeRALinear(nn.Module):
    """The adapter computes in its own dtype (float32, or float64 in a float64 run), as LoRA's does;
    the projections are frozen members in that dtype, slices of the plan's shared arrays."""

    def __init__(self, base_layer: nn.Module, values: dict[str, mx.array], layer: VeRALayer, stream: int = 0):
        super().__init__()
        self.base_layer = base_layer
        self.vera_lambda_b = values["vera_lambda_b"]
        self.vera_lambda_d = values["vera_lambda_d"]
        shared_a, shared_b = shared_projections(layer.projections, self.vera_lambda_d.dtype)
        self.vera_A = shared_a[:, : layer.in_features]  # slices of the plan's shared arrays
        self.vera_B = shared_b[: layer.out_features]
        self.freeze(recurse=False, keys=["vera_A", "vera_B"])
        self.dropout = layer.dropout
        self.stream = stream

    def __call__(self, x: mx.array) -> mx.array:
        h = dropout(x.astype(self.vera_lambda_d.dtype), self.dropout, self.stream, self.training)
        update = self.vera_lambda_b * ((self.vera_lambda_d * (h @ self.vera_A.T)) @ self.vera_B.T)
        return self.base_layer(x) + update.astype(x.dtype)
