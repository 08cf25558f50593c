"""LoRA for PyTorch: a frozen base linear (float or bitsandbytes NF4) plus a trainable low-rank path,
named as PEFT names it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from twintune.backends.torch.dropout import dropout
from twintune.dropout import dropout_stream
from twintune.methods import LoRA, adapted_layers


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(scale * lora_A(dropout(x))): scaled at rank r, not at the output width
    (the same function as PEFT's, one output-sized tensor fewer to keep for the backward).

    The adapter computes in its own dtype (float32, or float64 in a float64 run) whatever the
    base's, as PEFT does by default: its updates are small next to its values, and bfloat16 would
    round many of them away. Dropout masks come from the shared generator (this layer's stream:
    its name), so MLX drops the same elements."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, stream: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype)
        self.dropout = dropout
        self.stream = stream
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = dropout(x.to(self.lora_A.weight.dtype), self.dropout, self.stream, self.training)
        update = self.lora_B(self.lora_A(h) * self.scale)
        return self.base_layer(x) + update.to(x.dtype)


def apply_lora(model: nn.Module, method: LoRA, init: dict[str, np.ndarray]) -> None:
    """Swap each targeted linear for a LoRALinear holding the given initial values; only those train."""
    model.requires_grad_(False)
    for name in adapted_layers(init):
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        a, b = init[f"{name}.lora_A.weight"], init[f"{name}.lora_B.weight"]
        # Shapes come from the adapter: a quantized base layer's stored weight has another shape.
        layer = LoRALinear(getattr(parent, attr), a.shape[1], b.shape[0], method.r, method.scale, method.dropout,
                           dropout_stream(name), torch.from_numpy(a).dtype)
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.from_numpy(a))
            layer.lora_B.weight.copy_(torch.from_numpy(b))
        layer.base_layer.requires_grad_(False)
        setattr(parent, attr, layer)
