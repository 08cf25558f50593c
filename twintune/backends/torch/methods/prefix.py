"""Prefix tuning for PyTorch: the module in GPT-Neo's `transformer.prefix` slot (mirrors
backends/mlx/methods/prefix.py), named as PEFT's PrefixEncoder names its parts."""

from __future__ import annotations

import torch
from torch import nn
from twintune.backends.torch.methods.registry import builds
from twintune.methods.prefix import PrefixLayer


@builds(PrefixLayer)
class PrefixEncoder(nn.Module):
    """`prefix()` gives each block's (keys, values), each (heads, n, head_dim), cut from one
    (n, blocks * 2 * hidden) table as PEFT cuts it: block l's keys at slot 2l, values at 2l + 1.

    Without projection the table is `embedding.weight` itself; with it, the table is
    transform(embedding.weight): Linear, tanh, Linear (PEFT's reparameterisation). It is computed
    in the values' dtype; the attention casts it to its own."""

    def __init__(self, values: dict[str, torch.Tensor], layer: PrefixLayer, stream: int = 0):
        super().__init__()
        table = values["embedding.weight"]
        self.num_layers, self.num_heads = layer.num_layers, layer.num_heads
        self.embedding = nn.Embedding(*table.shape, dtype=table.dtype, device="meta")
        self.transform = None
        if layer.projection:
            hidden, width = values["transform.0.weight"].shape[0], values["transform.2.weight"].shape[0]
            self.transform = nn.Sequential(
                nn.Linear(table.shape[1], hidden, dtype=table.dtype, device="meta"),
                nn.Tanh(),
                nn.Linear(hidden, width, dtype=table.dtype, device="meta"),
            )

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        table = self.embedding.weight
        if self.transform is not None:
            table = self.transform(table)
        n = table.shape[0]
        # (n, blocks * 2 * hidden) -> (blocks * 2, heads, n, head_dim)
        slots = table.reshape(n, 2 * self.num_layers, self.num_heads, -1).permute(1, 2, 0, 3)
        return [(slots[2 * layer], slots[2 * layer + 1]) for layer in range(self.num_layers)]
