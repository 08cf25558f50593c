"""LoRA for MLX: a frozen base linear (float, NF4 or affine-quantized) plus a trainable low-rank path,
named as PEFT names it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from twintune.backends.mlx.dropout import dropout
from twintune.dropout import dropout_stream
from twintune.methods import LoRA, adapted_layers


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The module at a dotted path such as 'transformer.h.0.mlp.c_fc' (torch's get_submodule)."""
    node = model
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def exact_array(values: np.ndarray) -> mx.array:
    """numpy -> MLX keeping float64 (mx.array alone rounds float64 to float32)."""
    return mx.array(values, dtype=mx.float64) if values.dtype == np.float64 else mx.array(values)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, attr = name.rsplit(".", 1)
    setattr(get_submodule(model, parent_name), attr, module)


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(scale * lora_A(dropout(x))): scaled at rank r, not at the output width
    (the same function as PEFT's, one output-sized tensor fewer to keep for the backward).

    The adapter computes in its own dtype (float32, or float64 in a float64 run) whatever the
    base's, as PEFT does by default: its updates are small next to its values, and bfloat16 would
    round many of them away. Dropout masks come from the shared generator (this layer's stream:
    its name), so torch drops the same elements."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float, stream: int = 0):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = dropout
        self.stream = stream
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        h = dropout(x.astype(self.lora_A.weight.dtype), self.dropout, self.stream, self.training)
        update = self.lora_B(self.lora_A(h) * self.scale)
        return self.base_layer(x) + update.astype(x.dtype)


def apply_lora(model: nn.Module, method: LoRA, init: dict[str, np.ndarray]) -> None:
    """Swap each targeted linear for a LoRALinear holding the given initial values; only those train."""
    model.freeze()
    for name in adapted_layers(init):
        a, b = init[f"{name}.lora_A.weight"], init[f"{name}.lora_B.weight"]
        # Shapes come from the adapter: a quantized base layer's stored weight has another shape.
        layer = LoRALinear(get_submodule(model, name), a.shape[1], b.shape[0], method.r, method.scale, method.dropout,
                           dropout_stream(name))
        layer.lora_A.weight = exact_array(a)
        layer.lora_B.weight = exact_array(b)
        layer.base_layer.freeze()
        set_submodule(model, name, layer)
    mx.eval(model.parameters())
