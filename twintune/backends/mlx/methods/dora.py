"""DoRA for MLX: LoRA's path, then each output row rescaled to a learned magnitude (mirrors torch's)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from twintune.backends.mlx.methods.lora import LoRALinear


def base_weight(layer: nn.Module) -> mx.array:
    """The frozen layer's float weight (an NF4 layer's dequantized: the weight it computes with)."""
    return layer.dequantized_weight() if hasattr(layer, "dequantized_weight") else layer.weight


class DoRALinear(LoRALinear):
    """y = base(x) + (g - 1) W x' + g scale B A x',  g = m / ||W + scale B A|| (row norms, no gradient).

    x' is the adapter's (dropped-out) input. Without dropout W x' is base(x) minus the bias, as PEFT
    computes it; with dropout it is one more product with W, as in PEFT. The norm is recomputed each
    call from W and B A (out x in x r work, no identity matrix pushed through the layers as PEFT does)."""

    def __init__(self, base_layer: nn.Module, values: dict[str, mx.array], options: dict, stream: int = 0):
        super().__init__(base_layer, values, options, stream)
        self.lora_magnitude_vector = values["lora_magnitude_vector"]

    def __call__(self, x: mx.array) -> mx.array:
        out = self.base_layer(x)
        h = self.adapter_input(x)
        dtype = h.dtype
        weight = base_weight(self.base_layer).astype(dtype)
        lora_weight = self.lora_B.weight @ self.lora_A.weight
        norm = mx.stop_gradient(mx.sqrt(mx.square(weight + self.scale * lora_weight).sum(axis=1)))
        g = self.lora_magnitude_vector / norm
        if self.dropout > 0 and self.training:
            plain = h @ weight.T
        else:
            bias = getattr(self.base_layer, "bias", None)
            plain = out.astype(dtype) - (bias.astype(dtype) if bias is not None else 0)
        update = (g - 1) * plain + g * self.lora_B(self.lora_A(h) * self.scale)
        return out + update.astype(x.dtype)
