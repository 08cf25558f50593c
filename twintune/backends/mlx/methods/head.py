"""The heads for MLX (mirrors backends/torch/methods/head.py): the linear classification head, the
module of the model's `score` slot (transformers' GPTNeoForSequenceClassification's `score`: no
bias), and PPO's value head, of its `v_head` slot (TRL's ValueHead: with a bias)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from twintune.backends.mlx.methods.registry import builds
from twintune.tasks.classification import LinearHeadLayer
from twintune.tasks.ppo import ValueHeadLayer


@builds(LinearHeadLayer)
class LinearHead(nn.Module):
    """Class scores (..., labels) from hidden states, in the trainable dtype (a bfloat16 model's
    hidden states are widened first, as the vocabulary logits are)."""

    def __init__(self, values: dict[str, mx.array], layer: LinearHeadLayer, stream: int = 0):
        super().__init__()
        self.weight = mx.zeros(values["weight"].shape, dtype=values["weight"].dtype)

    def __call__(self, hidden: mx.array) -> mx.array:
        return hidden.astype(self.weight.dtype) @ self.weight.T


@builds(ValueHeadLayer)
class ValueHead(nn.Module):
    """The value (..., 1) of hidden states, in the trainable dtype."""

    def __init__(self, values: dict[str, mx.array], layer: ValueHeadLayer, stream: int = 0):
        super().__init__()
        self.weight = mx.zeros(values["weight"].shape, dtype=values["weight"].dtype)
        self.bias = mx.zeros(values["bias"].shape, dtype=values["bias"].dtype)

    def __call__(self, hidden: mx.array) -> mx.array:
        return hidden.astype(self.weight.dtype) @ self.weight.T + self.bias
