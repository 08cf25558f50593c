"""Prefix tuning for MLX: the module in GPT-Neo's `transformer.prefix` slot (mirrors
backends/torch/methods/prefix.py), named as PEFT's PrefixEncoder names its parts."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from twintune.backends.mlx.methods.registry import builds
from twintune.methods.prefix import PrefixLayer


@builds(PrefixLayer)
class PrefixEncoder(nn.Module):
    """`prefix()` gives each block's (keys, values), each (heads, n, head_dim), cut from one
    (n, blocks * 2 * hidden) table as PEFT cuts it: block l's keys at slot 2l, values at 2l + 1.

    Without projection the table is `embedding.weight` itself; with it, the table is
    transform(embedding.weight): Linear, tanh, Linear (PEFT's reparameterisation). It is computed
    in the values' dtype; the attention casts it to its own."""

    def __init__(self, values: dict[str, mx.array], layer: PrefixLayer, stream: int = 0):
        super().__init__()
        table = values["embedding.weight"]
        self.num_layers, self.num_heads = layer.num_layers, layer.num_heads
        self.embedding = nn.Embedding(*table.shape)
        self.transform = None
        if layer.projection:
            hidden, width = values["transform.0.weight"].shape[0], values["transform.2.weight"].shape[0]
            # a list, not nn.Sequential, so the names are torch's Sequential's: transform.0, transform.2
            self.transform = [nn.Linear(table.shape[1], hidden), nn.Tanh(), nn.Linear(hidden, width)]

    def __call__(self) -> list[tuple[mx.array, mx.array]]:
        table = self.embedding.weight
        if self.transform is not None:
            for layer in self.transform:
                table = layer(table)
        n = table.shape[0]
        # (n, blocks * 2 * hidden) -> (blocks * 2, heads, n, head_dim)
        slots = table.reshape(n, 2 * self.num_layers, self.num_heads, -1).transpose(1, 2, 0, 3)
        return [(slots[2 * layer], slots[2 * layer + 1]) for layer in range(self.num_layers)]
