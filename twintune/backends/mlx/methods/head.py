"""The linear classification head for MLX: the module of the model's `score` slot (mirrors
backends/torch/methods/head.py). transformers' GPTNeoForSequenceClassification's `score`: no bias."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from twintune.backends.mlx.methods.registry import builds
from twintune.tasks.classification import LinearHeadLayer


@builds(LinearHeadLayer)
class LinearHead(nn.Module):
    """Class scores (..., labels) from hidden states, in the trainable dtype (a bfloat16 model's
    hidden states are widened first, as the vocabulary logits are)."""

    def __init__(self, values: dict[str, mx.array], layer: LinearHeadLayer, stream: int = 0):
        super().__init__()
        self.weight = mx.zeros(values["weight"].shape, dtype=values["weight"].dtype)

    def __call__(self, hidden: mx.array) -> mx.array:
        return hidden.astype(self.weight.dtype) @ self.weight.T
