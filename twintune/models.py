"""Backend-neutral model specs: what a config.json means, and canonical weight names.

Both backends build their model from a spec and a dict of numpy weights named as in a
Hugging Face `GPTNeoForCausalLM` checkpoint (`transformer.h.0.attn.attention.q_proj.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from twintune.errors import TwintuneError


@dataclass(frozen=True)
class GPTNeoSpec:
    vocab_size: int
    max_positions: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    attention_layers: tuple[str, ...]  # "global" or "local", one per block
    window_size: int
    layer_norm_eps: float

    blocks: ClassVar[str] = "h"  # the block list's name in parameter names (PEFT's layers_pattern)

    @classmethod
    def from_config(cls, config: dict) -> "GPTNeoSpec":
        """Read a Hugging Face GPT-Neo config.json dict.

        Example:
            >>> from twintune.formats.checkpoint import load_checkpoint
            >>> GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config).num_layers
            4
        """
        if config.get("model_type") != "gpt_neo":
            raise TwintuneError(f"model type {config.get('model_type')!r} is not supported yet; twintune runs GPT-Neo (model_type 'gpt_neo').")
        activation = config.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise TwintuneError(f"GPT-Neo activation {activation!r} is not supported; only 'gelu_new' is.")
        hidden = config["hidden_size"]
        layers = []
        for pattern, repeat in config["attention_types"]:
            layers.extend(list(pattern) * repeat)
        if len(layers) != config["num_layers"]:
            raise TwintuneError(f"config attention_types describe {len(layers)} layers but num_layers is {config['num_layers']}.")
        return cls(
            vocab_size=config["vocab_size"],
            max_positions=config["max_position_embeddings"],
            hidden_size=hidden,
            num_layers=config["num_layers"],
            num_heads=config["num_heads"],
            intermediate_size=config.get("intermediate_size") or 4 * hidden,
            attention_layers=tuple(layers),
            window_size=config.get("window_size", 256),
            layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        )

    # The short names of every block's linear layers (what "all-linear" means for GPT-Neo).
    LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """Every linear layer a method may adapt: name -> (out_features, in_features)."""
        d, f = self.hidden_size, self.intermediate_size
        layers = {}
        for i in range(self.num_layers):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                layers[f"transformer.h.{i}.attn.attention.{proj}"] = (d, d)
            layers[f"transformer.h.{i}.mlp.c_fc"] = (f, d)
            layers[f"transformer.h.{i}.mlp.c_proj"] = (d, f)
        return layers

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.wte.weight": (self.vocab_size, d),
            "transformer.wpe.weight": (self.max_positions, d),
            "transformer.ln_f.weight": (d,),
            "transformer.ln_f.bias": (d,),
        }
        for name, shape in self.linear_layers().items():
            shapes[f"{name}.weight"] = shape
            if not name.endswith(("q_proj", "k_proj", "v_proj")):
                shapes[f"{name}.bias"] = (shape[0],)
        for i in range(self.num_layers):
            for ln in ("ln_1", "ln_2"):
                shapes[f"transformer.h.{i}.{ln}.weight"] = (d,)
                shapes[f"transformer.h.{i}.{ln}.bias"] = (d,)
        return shapes


def gpt_neo_weights(spec: GPTNeoSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical float32 GPT-Neo weights, checked against the spec.

    Accepts checkpoints saved from `GPTNeoModel` (no `transformer.` prefix), drops the causal
    mask buffers old checkpoints carry, and drops `lm_head.weight` (GPT-Neo ties it to wte).
    """
    out = {}
    for name, array in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "attention.bias", "attention.masked_bias")):
            continue
        if name == "lm_head.weight":
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name
        out[name] = np.asarray(array, dtype=np.float32)
    expected = spec.weight_shapes()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise TwintuneError(f"checkpoint lacks {len(missing)} GPT-Neo weights, first {missing[0]!r}; is it a GPT-Neo model?")
    for name, shape in expected.items():
        if out[name].shape != shape:
            raise TwintuneError(f"checkpoint weight {name!r} has shape {out[name].shape}, the config implies {shape}.")
    extra = sorted(set(out) - set(expected))
    if extra:
        raise TwintuneError(f"checkpoint has {len(extra)} weights GPT-Neo does not use, first {extra[0]!r}.")
    return out


def mlx_lm_has_family(model_type: str | None) -> bool:
    """Whether mlx-lm (when installed) implements this config.json model_type (looked up, not imported).

    Example:
        >>> mlx_lm_has_family("llama"), mlx_lm_has_family("gpt_neo")
        (True, False)
    """
    import importlib.util

    if not model_type or not importlib.util.find_spec("mlx_lm"):
        return False
    return importlib.util.find_spec(f"mlx_lm.models.{model_type}") is not None
