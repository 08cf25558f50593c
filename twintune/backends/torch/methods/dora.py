"""DoRA for torch: LoRA's path, then each output row rescaled to a learned magnitude (mirrors MLX's)."""

from __future__ import annotations

import torch
from torch import nn

from twintune.backends.torch.methods.lora import LoRALinear
from twintune.backends.torch.methods.registry import builds
from twintune.methods.dora import DoRALayer


@builds(DoRALayer)
class DoRALinear(LoRALinear):
    """y = base(x) + (g - 1) W x' + g scale B A x',  g = m / ||W + scale B A|| (row norms, no gradient).

    x' is the adapter's (dropped-out) input; W x' is base(x') less the bias, as PEFT computes it.
    The norm never builds W + scale B A (out x in), as PEFT does each step (through an identity
    matrix): ||W_i||^2 comes with the plan (the base is frozen) and the rest is small,
        ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T,
    with W A^T read off the frozen layer itself (base(A) less the bias), whatever its storage."""

    def __init__(self, base_layer: nn.Module, values: dict[str, torch.Tensor], layer: DoRALayer, stream: int = 0):
        super().__init__(base_layer, values, layer, stream)
        m = values["lora_magnitude_vector"]
        self.lora_magnitude_vector = nn.Parameter(torch.empty(m.shape, dtype=m.dtype, device="meta"))
        norm_sq = torch.from_numpy(layer.weight_norm_sq).to(m.dtype).to(m.device)
        self.register_buffer("weight_norm_sq", norm_sq, persistent=False)

    def without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """W x through the frozen layer, in the adapter's dtype."""
        out = self.base_layer(x).to(self.lora_A.weight.dtype)
        bias = getattr(self.base_layer, "bias", None)
        return out - bias.to(out.dtype) if bias is not None else out

    @torch.no_grad()
    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        w_at = self.without_bias(a.to(dtype)).T  # (out, r)
        cross = (b * w_at).sum(dim=1)
        update = ((b @ (a @ a.T)) * b).sum(dim=1)
        return torch.sqrt(self.weight_norm_sq + 2 * self.scale * cross + self.scale**2 * update)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = self.adapter_input(x)
        g = self.lora_magnitude_vector / self.weight_norm(x.dtype)
        if self.dropout > 0 and self.training:
            plain = self.without_bias(h.to(x.dtype))
        else:
            bias = getattr(self.base_layer, "bias", None)
            plain = out.to(h.dtype) - (bias.to(h.dtype) if bias is not None else 0)
        update = (g - 1) * plain + g * self.lora_B(self.lora_A(h) * self.scale)
        return out + update.to(x.dtype)
