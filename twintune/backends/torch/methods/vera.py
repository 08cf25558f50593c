"""VeRA for PyTorch: a frozen base linear plus lambda_b * B (lambda_d * A dropout(x)), named as PEFT names
it; A and B are this layer's slices of the shared frozen projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twintune.backends.torch.dropout import dropout
from twintune.backends.torch.methods.registry import builds
from twintune.methods.vera import VeRALayer


@builds(VeRALayer)
class VeRALinear(nn.Module):
    """The adapter computes in its own dtype (float32, or float64 in a float64 run), as LoRA's does;
    the projections are buffers in that dtype, outside the state a checkpoint saves (the plan
    draws them again from projection_prng_key)."""

    def __init__(self, base_layer: nn.Module, values: dict[str, torch.Tensor], layer: VeRALayer, stream: int = 0):
        super().__init__()
        b, d = values["vera_lambda_b"], values["vera_lambda_d"]
        self.base_layer = base_layer
        self.vera_lambda_b = nn.Parameter(torch.empty(b.shape, dtype=b.dtype, device="meta"))
        self.vera_lambda_d = nn.Parameter(torch.empty(d.shape, dtype=d.dtype, device="meta"))
        self.register_buffer("vera_A", torch.from_numpy(layer.vera_A).to(d.device, d.dtype), persistent=False)
        self.register_buffer("vera_B", torch.from_numpy(layer.vera_B).to(d.device, d.dtype), persistent=False)
        self.dropout = layer.dropout
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = dropout(x.to(self.vera_lambda_d.dtype), self.dropout, self.stream, self.training)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, self.vera_A), self.vera_B)
        return self.base_layer(x) + update.to(x.dtype)
