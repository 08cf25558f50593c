"""DoRA for torch: LoRA's path, then each output row rescaled to a learned magnitude (mirrors MLX's)."""

from __future__ import annotations

import torch
from torch import nn

from twintune.backends.torch.methods.lora import LoRALinear


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen layer's float weight (an NF4 layer's dequantized: the weight it computes with)."""
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight()
    if hasattr(layer.weight, "quant_state"):  # bitsandbytes' Linear4bit: checked equal to ours when built
        import bitsandbytes.functional as bnb

        return bnb.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight


class DoRALinear(LoRALinear):
    """y = base(x) + (g - 1) W x' + g scale B A x',  g = m / ||W + scale B A|| (row norms, no gradient).

    x' is the adapter's (dropped-out) input. Without dropout W x' is base(x) minus the bias, as PEFT
    computes it; with dropout it is one more product with W, as in PEFT. The norm is recomputed each
    call from W and B A (out x in x r work, no identity matrix pushed through the layers as PEFT does)."""

    def __init__(self, base_layer: nn.Module, values: dict[str, torch.Tensor], options: dict, stream: int = 0):
        super().__init__(base_layer, values, options, stream)
        m = values["lora_magnitude_vector"]
        self.lora_magnitude_vector = nn.Parameter(torch.empty(m.shape, dtype=m.dtype, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = self.adapter_input(x)
        dtype = h.dtype
        weight = base_weight(self.base_layer).to(dtype)
        lora_weight = self.lora_B.weight @ self.lora_A.weight
        with torch.no_grad():
            norm = torch.sqrt(torch.square(weight + self.scale * lora_weight).sum(dim=1))
        g = self.lora_magnitude_vector / norm
        if self.dropout > 0 and self.training:
            plain = h @ weight.T
        else:
            bias = getattr(self.base_layer, "bias", None)
            plain = out.to(dtype) - (bias.to(dtype) if bias is not None else 0)
        update = (g - 1) * plain + g * self.lora_B(self.lora_A(h) * self.scale)
        return out + update.to(x.dtype)
