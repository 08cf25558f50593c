"""LoRA for MLX: a frozen base linear (float, NF4 or affine-quantized) plus a trainable low-rank path,
named as PEFT names it."""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from twintune.methods import LoRA, adapted_layers


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The module at a dotted path such as 'transformer.h.0.mlp.c_fc' (torch's get_submodule)."""
    node = model
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, attr = name.rsplit(".", 1)
    setattr(get_submodule(model, parent_name), attr, module)


_replay_key: list[mx.array] = []  # set around a block in training: its dropout masks come from this key


@contextmanager
def replayable_dropout(key: mx.array):
    """Draw the LoRA dropout masks of a block from `key`, so that running the block again (the
    backward of gradient checkpointing) draws the same masks."""
    _replay_key.append(key)
    try:
        yield
    finally:
        _replay_key.pop()


def dropout(x: mx.array, p: float, training: bool) -> mx.array:
    if not training or p == 0:
        return x
    key = None
    if _replay_key:
        _replay_key[-1], key = mx.random.split(_replay_key[-1])
    keep = mx.random.bernoulli(1 - p, x.shape, key=key)
    return (keep * x) * (1 / (1 - p))


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(scale * lora_A(dropout(x))): scaled at rank r, not at the output width
    (the same function as PEFT's, one output-sized tensor fewer to keep for the backward).

    The adapter computes in float32 whatever the base's dtype, as PEFT does by default: its
    updates are small next to its values, and bfloat16 would round many of them away."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, scale: float,
                 dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = dropout
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        update = self.lora_B(self.lora_A(dropout(x, self.dropout, self.training).astype(mx.float32)) * self.scale)
        return self.base_layer(x) + update.astype(x.dtype)


def apply_lora(model: nn.Module, method: LoRA, init: dict[str, np.ndarray]) -> None:
    """Swap each targeted linear for a LoRALinear holding the given initial values; only those train."""
    model.freeze()
    for name in adapted_layers(init):
        a, b = init[f"{name}.lora_A.weight"], init[f"{name}.lora_B.weight"]
        # Shapes come from the adapter: a quantized base layer's stored weight has another shape.
        layer = LoRALinear(get_submodule(model, name), a.shape[1], b.shape[0], method.r, method.scale, method.dropout)
        layer.lora_A.weight = mx.array(a)
        layer.lora_B.weight = mx.array(b)
        layer.base_layer.freeze()
        set_submodule(model, name, layer)
    mx.eval(model.parameters())
