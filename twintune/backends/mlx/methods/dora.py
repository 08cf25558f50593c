"""DoRA for MLX: LoRA's path, then each output row rescaled to a learned magnitude (mirrors torch's)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from twintune.backends.mlx.methods.lora import LoRALinear
from twintune.backends.mlx.methods.registry import builds
from twintune.methods.dora import DoRALayer


@builds(DoRALayer)
class DoRALinear(LoRALinear):
    """y = base(x) + (g - 1) W x' + g scale B A x',  g = m / ||W + scale B A|| (row norms, no gradient).

    x' is the adapter's (dropped-out) input; W x' is base(x') less the bias, as PEFT computes it.
    The norm never builds W + scale B A (out x in), as PEFT does each step (through an identity
    matrix): ||W_i||^2 comes with the plan (the base is frozen) and the rest is small,
        ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T,
    with W A^T read off the frozen layer itself (base(A) less the bias), whatever its storage."""

    def __init__(self, base_layer: nn.Module, values: dict[str, mx.array], layer: DoRALayer, stream: int = 0):
        super().__init__(base_layer, values, layer, stream)
        self.lora_magnitude_vector = values["lora_magnitude_vector"]
        self.weight_norm_sq = mx.array(layer.weight_norm_sq, dtype=self.lora_magnitude_vector.dtype)
        self.freeze(recurse=False, keys=["weight_norm_sq"])

    def without_bias(self, x: mx.array) -> mx.array:
        """W x through the frozen layer, in the adapter's dtype."""
        out = self.base_layer(x).astype(self.lora_A.weight.dtype)
        bias = getattr(self.base_layer, "bias", None)
        return out - bias.astype(out.dtype) if bias is not None else out

    def weight_norm(self, dtype) -> mx.array:
        a, b = mx.stop_gradient(self.lora_A.weight), mx.stop_gradient(self.lora_B.weight)
        w_at = self.without_bias(a.astype(dtype)).T  # (out, r)
        cross = (b * w_at).sum(axis=1)
        update = ((b @ (a @ a.T)) * b).sum(axis=1)
        return mx.stop_gradient(mx.sqrt(self.weight_norm_sq + 2 * self.scale * cross + self.scale**2 * update))

    def __call__(self, x: mx.array) -> mx.array:
        out = self.base_layer(x)
        h = self.adapter_input(x)
        g = self.lora_magnitude_vector / self.weight_norm(x.dtype)
        if self.dropout > 0 and self.training:
            plain = self.without_bias(h.astype(x.dtype))
        else:
            bias = getattr(self.base_layer, "bias", None)
            plain = out.astype(h.dtype) - (bias.astype(h.dtype) if bias is not None else 0)
        update = (g - 1) * plain + g * self.lora_B(self.lora_A(h) * self.scale)
        return out + update.astype(x.dtype)
