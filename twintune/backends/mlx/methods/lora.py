"""LoRA for MLX: a frozen base linear (float, NF4 or affine-quantized) plus a trainable low-rank path,
named as PEFT names it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from twintune.backends.mlx.dropout import dropout
from twintune.backends.mlx.methods.registry import builds
from twintune.methods.lora import LoRALayer


@builds(LoRALayer)
class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(scale * lora_A(dropout(x))): scaled at rank r, not at the output width
    (the same function as PEFT's, one output-sized tensor fewer to keep for the backward).

    The adapter computes in its own dtype (float32, or float64 in a float64 run) whatever the
    base's, as PEFT does by default: its updates are small next to its values, and bfloat16 would
    round many of them away. Dropout masks come from the shared generator (this layer's stream:
    its name), so torch drops the same elements."""

    def __init__(self, base_layer: nn.Module, values: dict[str, mx.array], layer: LoRALayer, stream: int = 0):
        super().__init__()
        # Shapes come from the initial values: a quantized base layer's stored weight has another shape.
        r, in_features = values["lora_A.weight"].shape
        out_features = values["lora_B.weight"].shape[0]
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = layer.dropout
        self.stream = stream
        self.scale = layer.scale

    def adapter_input(self, x: mx.array) -> mx.array:
        """x in the adapter's dtype, with this layer's dropout."""
        return dropout(x.astype(self.lora_A.weight.dtype), self.dropout, self.stream, self.training)

    def __call__(self, x: mx.array) -> mx.array:
        update = self.lora_B(self.lora_A(self.adapter_input(x)) * self.scale)
        return self.base_layer(x) + update.astype(x.dtype)
