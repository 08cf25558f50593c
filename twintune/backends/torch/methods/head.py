"""The heads for torch (mirrors backends/mlx/methods/head.py): the linear classification head, the
module of the model's `score` slot (transformers' GPTNeoForSequenceClassification's `score`: no
bias), and PPO's value head, of its `v_head` slot (TRL's ValueHead: with a bias)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from twintune.backends.torch.methods.registry import builds
from twintune.tasks.classification import LinearHeadLayer
from twintune.tasks.ppo import ValueHeadLayer


@builds(LinearHeadLayer)
class LinearHead(nn.Module):
    """Class scores (..., labels) from hidden states, in the trainable dtype (a bfloat16 model's
    hidden states are widened first, as the vocabulary logits are)."""

    def __init__(self, values: dict[str, torch.Tensor], layer: LinearHeadLayer, stream: int = 0):
        super().__init__()
        weight = values["weight"]
        self.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.weight.dtype), self.weight)


@builds(ValueHeadLayer)
class ValueHead(nn.Module):
    """The value (..., 1) of hidden states, in the trainable dtype."""

    def __init__(self, values: dict[str, torch.Tensor], layer: ValueHeadLayer, stream: int = 0):
        super().__init__()
        weight, bias = values["weight"], values["bias"]
        self.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"))
        self.bias = nn.Parameter(torch.empty(bias.shape, dtype=bias.dtype, device="meta"))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)
