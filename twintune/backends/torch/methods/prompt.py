"""Prompt tuning and P-tuning for torch: modules for the model's `transformer.prompt` slot, called as
`prompt()` -> the (n, d) virtual-token embeddings (mirrors backends/mlx/methods/prompt.py).

P-tuning's LSTM is written out here (torch's equations, gate order i, f, g, o, and nn.LSTM's
parameter names) rather than taken from either framework, so both backends compute the same
numbers; torch's own nn.LSTM is the reference in tests/methods/test_prompt.py."""

from __future__ import annotations

import torch
from torch import nn

from twintune.backends.torch.dropout import dropout
from twintune.dropout import MASK32
from twintune.backends.torch.methods.registry import builds
from twintune.methods.prompt import PromptEmbeddingLayer, PromptEncoderLayer


@builds(PromptEmbeddingLayer)
class PromptEmbedding(nn.Module):
    """Prompt tuning: the virtual tokens' embeddings are the trained values (PEFT's `embedding`)."""

    def __init__(self, values: dict[str, torch.Tensor], layer: PromptEmbeddingLayer, stream: int = 0):
        super().__init__()
        weight = values["embedding.weight"]
        self.embedding = nn.Embedding(*weight.shape, dtype=weight.dtype, device="meta")

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


@builds(PromptEncoderLayer)
class PromptEncoder(nn.Module):
    """P-tuning: an input embedding through an MLP, or a bidirectional LSTM then an MLP (PEFT's
    `embedding`, `lstm_head`, `mlp_head.{0,2,4}`); its output is the virtual tokens' embeddings."""

    def __init__(self, values: dict[str, torch.Tensor], layer: PromptEncoderLayer, stream: int = 0):
        super().__init__()
        weight = values["embedding.weight"]
        self.embedding = nn.Embedding(*weight.shape, dtype=weight.dtype, device="meta")
        self.lstm_head = LSTM(values, layer.num_layers, layer.dropout, stream) \
            if layer.encoder == "lstm" else None
        linears = sorted(int(name.split(".")[1]) for name in values if name.startswith("mlp_head.") and name.endswith(".weight"))
        self.mlp_head = nn.ModuleList()
        for i in linears:
            out_features, in_features = values[f"mlp_head.{i}.weight"].shape
            self.mlp_head += [nn.Linear(in_features, out_features, dtype=weight.dtype, device="meta")] + \
                ([nn.ReLU()] if i != linears[-1] else [])

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x)
        for layer in self.mlp_head:
            x = layer(x)
        return x


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    # through tanh, as MLX computes it (its float64 exp is only float32-accurate, its tanh is exact)
    return 0.5 * (1 + torch.tanh(0.5 * x))


class LSTM(nn.Module):
    """torch.nn.LSTM(bidirectional=True) over one sequence (n, input) -> (n, 2 * hidden), with
    dropout on each layer's output but the last's. Parameters named as nn.LSTM's state_dict."""

    def __init__(self, values: dict[str, torch.Tensor], num_layers: int, dropout: float, stream: int):
        super().__init__()
        for name, value in values.items():
            if name.startswith("lstm_head."):
                empty = torch.empty(value.shape, dtype=value.dtype, device="meta")
                self.register_parameter(name.removeprefix("lstm_head."), nn.Parameter(empty))
        self.num_layers = num_layers
        self.dropout = dropout
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.num_layers):
            if k > 0:  # each layer's stream its own, so two layers' masks differ
                x = dropout(x, self.dropout, (self.stream + k) & MASK32, self.training)
            x = torch.cat([self.direction(x, k, ""), self.direction(x, k, "_reverse")], dim=1)
        return x

    def direction(self, x: torch.Tensor, k: int, suffix: str) -> torch.Tensor:
        """One direction of layer k: h and c run over the rows forwards, or backwards for `_reverse`."""
        w_ih, w_hh = getattr(self, f"weight_ih_l{k}{suffix}"), getattr(self, f"weight_hh_l{k}{suffix}")
        inputs = x @ w_ih.T + getattr(self, f"bias_ih_l{k}{suffix}") + getattr(self, f"bias_hh_l{k}{suffix}")
        h = c = torch.zeros(w_hh.shape[1], dtype=w_hh.dtype, device=w_hh.device)
        out = [None] * x.shape[0]
        for t in (range(x.shape[0]) if suffix == "" else reversed(range(x.shape[0]))):
            i, f, g, o = torch.chunk(inputs[t] + h @ w_hh.T, 4)
            c = sigmoid(f) * c + sigmoid(i) * torch.tanh(g)
            h = sigmoid(o) * torch.tanh(c)
            out[t] = h
        return torch.stack(out)
