"""LoRA for PyTorch: a frozen base linear (float or bitsandbytes NF4) plus a trainable low-rank path,
named as PEFT names it."""

from __future__ import annotations

import torch
from torch import nn

from twintune.backends.torch.dropout import dropout
from twintune.backends.torch.methods.registry import builds
from twintune.methods.lora import LoRALayer


@builds(LoRALayer)
class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(scale * lora_A(dropout(x))): scaled at rank r, not at the output width
    (the same function as PEFT's, one output-sized tensor fewer to keep for the backward).

    The adapter computes in its own dtype (float32, or float64 in a float64 run) whatever the
    base's, as PEFT does by default: its updates are small next to its values, and bfloat16 would
    round many of them away. Dropout masks come from the shared generator (this layer's stream:
    its name), so MLX drops the same elements."""

    def __init__(self, base_layer: nn.Module, values: dict[str, torch.Tensor], layer: LoRALayer, stream: int = 0):
        super().__init__()
        # Shapes come from the initial values: a quantized base layer's stored weight has another shape.
        a, b = values["lora_A.weight"], values["lora_B.weight"]
        self.base_layer = base_layer
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=a.dtype, device="meta")
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=b.dtype, device="meta")
        self.dropout = layer.dropout
        self.stream = stream
        self.scale = layer.scale

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the adapter's dtype, with this layer's dropout."""
        return dropout(x.to(self.lora_A.weight.dtype), self.dropout, self.stream, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.adapter_input(x)) * self.scale)
        return self.base_layer(x) + update.to(x.dtype)
