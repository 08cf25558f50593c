"""GPT-Neo shapes with random weights, built layer by layer (quantized as they are drawn)."""

from __future__ import annotations

import numpy as np

from twintune.models import GPTNeoSpec
from twintune.quant import Quantization
from twintune.quant.nf4 import NF4Tensor, quantize_nf4

GPT_NEO_CONFIGS = {
    "1.3b": dict(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=8192, vocab_size=50257,
                 max_position_embeddings=2048),
    "125m": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=50257,
                 max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256, vocab_size=1024,
                 max_position_embeddings=512),
}


def gpt_neo_config(shape: str) -> dict:
    config = dict(GPT_NEO_CONFIGS[shape])
    config.update(model_type="gpt_neo", window_size=256, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                  attention_types=[[["global", "local"], config["num_layers"] // 2]])
    return config


def random_model(shape: str, quantization: Quantization | None = None, seed: int = 0
                 ) -> tuple[GPTNeoSpec, dict[str, np.ndarray], dict[str, NF4Tensor]]:
    """Spec, float weights and (when asked) NF4 linear layers; a float copy of a quantized layer never lives long."""
    spec = GPTNeoSpec.from_config(gpt_neo_config(shape))
    rng = np.random.default_rng(seed)
    linear = {f"{name}.weight" for name in spec.linear_layers()}
    weights, quantized = {}, {}
    for name, dims in spec.weight_shapes().items():
        if ".ln_" in name:
            value = np.ones(dims, np.float32) if name.endswith("weight") else np.zeros(dims, np.float32)
        elif name.endswith(".bias"):
            value = np.zeros(dims, np.float32)
        else:
            value = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
        if quantization and quantization.type == "nf4" and name in linear:
            quantized[name.removesuffix(".weight")] = quantize_nf4(value, quantization.blocksize, quantization.double_quant)
        else:
            weights[name] = value
    return spec, weights, quantized
