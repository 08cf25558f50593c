"""VeRA for PyTorch: a frozen base linear plus lambda_b * B (lambda_d * A dropout(x)), named as PEFT names
it; A and B are this layer's slices of the shared frozen projections."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from twintune.backends.torch.dropout import dropout
from twintune.backends.torch.methods.registry import builds
from twintune.methods.vera import Projections, VeRALayer


_CONVERTED: "weakref.WeakKeyDictionary[Projections, dict]" = weakref.WeakKeyDictionary()


def shared_projections(projections: Projections, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A plan's projections as tensors, made once per dtype and device and shared by its layers."""
    held = _CONVERTED.setdefault(projections, {})
    if (dtype, device) not in held:
        held[dtype, device] = tuple(torch.from_numpy(array).to(device, dtype)
                                    for array in (projections.vera_A, projections.vera_B))
    return held[dtype, device]


@builds(VeRALayer)
class VeRALinear(nn.Module):
    """The adapter computes in its own dtype (float32, or float64 in a float64 run), as LoRA's does;
    the projections are views of the plan's shared tensors in that dtype, outside the state a
    checkpoint saves (the plan draws them again from projection_prng_key)."""

    def __init__(self, base_layer: nn.Module, values: dict[str, torch.Tensor], layer: VeRALayer, stream: int = 0):
        super().__init__()
        b, d = values["vera_lambda_b"], values["vera_lambda_d"]
        self.base_layer = base_layer
        self.vera_lambda_b = nn.Parameter(torch.empty(b.shape, dtype=b.dtype, device="meta"))
        self.vera_lambda_d = nn.Parameter(torch.empty(d.shape, dtype=d.dtype, device="meta"))
        shared_a, shared_b = shared_projections(layer.projections, d.dtype, d.device)
        self.vera_A = shared_a[:, : layer.in_features]  # views: not buffers, which .to() would copy per layer
        self.vera_B = shared_b[: layer.out_features]
        self.dropout = layer.dropout
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = dropout(x.to(self.vera_lambda_d.dtype), self.dropout, self.stream, self.training)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, self.vera_A), self.vera_B)
        return self.base_layer(x) + update.to(x.dtype)
