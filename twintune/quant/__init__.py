"""Backend-neutral quantization formats (numpy): NF4 as bitsandbytes lays it out.

`Quantization` says what a recipe asks for; `quantize_linear_layers` turns the frozen linear
weights of a model into shared NF4 tensors once, before any backend sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twintune.quant.nf4 import NF4Tensor, quantize_nf4

# Which backends can hold which format: NF4 on both (the parity format), affine on MLX only.


@dataclass(frozen=True)
class Quantization:
    """How the frozen base is stored: NF4 (blocksize, double quant) or MLX's affine (bits, group)."""

    type: str  # nf4 | affine: the recipe's quantize.type
    double_quant: bool = True
    blocksize: int = 64
    bits: int = 4
    group_size: int = 64


def quantize_linear_layers(weights: dict[str, np.ndarray], layer_names: list[str],
                           quantization: Quantization) -> dict[str, NF4Tensor]:
    """Quantize the named linear layers' weights to NF4, removing the float copies from `weights`.

    Example:
        >>> q = quantize_linear_layers(weights, list(spec.linear_layers()), Quantization("nf4"))
        >>> "transformer.h.0.mlp.c_fc.weight" in weights
        False
    """
    quantized = {}
    for name in layer_names:
        quantized[name] = quantize_nf4(weights.pop(f"{name}.weight"), quantization.blocksize,
                                       quantization.double_quant)
    return quantized
