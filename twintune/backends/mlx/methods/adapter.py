"""Bottleneck adapters for MLX: a module in a block's adapter slot (mirrors backends/torch/methods/adapter.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from twintune.backends.mlx.dropout import dropout
from twintune.backends.mlx.gpt_neo import gelu_new
from twintune.backends.mlx.methods.registry import builds
from twintune.methods.adapter import BottleneckLayer


def swish(x: mx.array) -> mx.array:
    """x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2: MLX's sigmoid is float32-accurate on
    float64 arrays, its tanh is exact."""
    return x * (0.5 + 0.5 * mx.tanh(0.5 * x))


ACTIVATIONS = {"relu": nn.relu, "swish": swish, "gelu_new": gelu_new, "tanh": mx.tanh}


@builds(BottleneckLayer)
class Bottleneck(nn.Module):
    """Given the sublayer's output s and the residual stream x, returns
    x + s + dropout(up(act(down(h)))), with h = s (Houlsby) or h = x + s (Pfeiffer): AdapterHub's
    bottleneck on a pre-LayerNorm block (twintune/methods/adapter.py derives it).

    The bottleneck computes in its own dtype (float32, or float64 in a float64 run) whatever the
    model's, like LoRA; its output is cast back before the addition. Dropout masks come from the
    shared generator (this slot's stream), so torch drops the same elements."""

    def __init__(self, values: dict[str, mx.array], layer: BottleneckLayer, stream: int = 0):
        super().__init__()
        bottleneck, hidden = values["down.weight"].shape
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.activation = ACTIVATIONS[layer.non_linearity]
        self.dropout = layer.dropout
        self.reads_stream = layer.reads_stream
        self.stream = stream

    def __call__(self, output: mx.array, residual: mx.array) -> mx.array:
        stream = residual + output  # what the block adds without an adapter
        h = (stream if self.reads_stream else output).astype(self.down.weight.dtype)
        update = dropout(self.up(self.activation(self.down(h))), self.dropout, self.stream, self.training)
        return stream + update.astype(stream.dtype)
