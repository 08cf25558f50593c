"""Bottleneck adapters for torch: a module in a block's adapter slot (mirrors backends/mlx/methods/adapter.py)."""

from __future__ import annotations

import torch
from torch import nn

from twintune.backends.torch.dropout import dropout
from twintune.backends.torch.gpt_neo import gelu_new
from twintune.backends.torch.methods.registry import builds
from twintune.methods.adapter import BottleneckLayer


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2: the formula MLX computes (its sigmoid
    is float32-accurate on float64 arrays, its tanh is exact)."""
    return x * (0.5 + 0.5 * torch.tanh(0.5 * x))


ACTIVATIONS = {"relu": torch.relu, "swish": swish, "gelu_new": gelu_new, "tanh": torch.tanh}


@builds(BottleneckLayer)
class Bottleneck(nn.Module):
    """Given the sublayer's output s and the residual stream x, returns
    x + s + dropout(up(act(down(h)))), with h = s (Houlsby) or h = x + s (Pfeiffer): AdapterHub's
    bottleneck on a pre-LayerNorm block (twintune/methods/adapter.py derives it).

    The bottleneck computes in its own dtype (float32, or float64 in a float64 run) whatever the
    model's, like LoRA; its output is cast back before the addition. Dropout masks come from the
    shared generator (this slot's stream), so MLX drops the same elements."""

    def __init__(self, values: dict[str, torch.Tensor], layer: BottleneckLayer, stream: int = 0):
        super().__init__()
        bottleneck, hidden = values["down.weight"].shape
        dtype = values["down.weight"].dtype
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device="meta")
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device="meta")
        self.activation = ACTIVATIONS[layer.non_linearity]
        self.dropout = layer.dropout
        self.reads_stream = layer.reads_stream
        self.stream = stream

    def forward(self, output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        stream = residual + output  # what the block adds without an adapter
        h = (stream if self.reads_stream else output).to(self.down.weight.dtype)
        update = dropout(self.up(self.activation(self.down(h))), self.dropout, self.stream, self.training)
        return stream + update.to(stream.dtype)
