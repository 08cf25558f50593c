"""An mlx-lm model (llama, qwen2, mistral, gpt2, ...) behind the interface our MLX backend trains.

mlx-lm covers many model families in MLX; wrapping one lets the MLX backend fine-tune it with
our LoRA, our step (logits only at the label positions) and our AdamW. It is MLX-only: the torch
backend has no such models, so cross-backend parity holds for GPT-Neo, not for these.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import activations

from twintune.errors import TwintuneError


class MLXLMModel(nn.Module):
    """The blocks of an mlx-lm `Model`, returning hidden states; `logits` applies its output layer.

    Parameter names are mlx-lm's (`model.layers.0.self_attn.q_proj.weight`), which for the llama
    family are also Hugging Face's.

    Example:
        >>> from mlx_lm.models import llama
        >>> inner = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
        ...     intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=1000))
        >>> hidden = MLXLMModel(inner)(mx.array([[1, 2, 3]]))
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        if not hasattr(inner, "model"):
            raise TwintuneError(f"{type(inner).__module__} is not an mlx-lm language model (it has no .model).")
        self.model = lean_swiglu_mlps(inner.model)
        if "lm_head" in inner:
            self.lm_head = inner.lm_head
        self.model_type = getattr(inner, "model_type", type(inner).__module__.rsplit(".", 1)[-1])
        args = getattr(inner, "args", None)
        # positions the model was built for (learned position tables); None: rotary, no fixed limit
        self.max_positions = getattr(args, "max_position_embeddings", None) or getattr(args, "n_positions", None)
        self.score = None  # the slot of a classification head (twintune/tasks.py)
        self.v_head = None  # the slot of PPO's value head (tasks/ppo.py)
        self._cache_maker = getattr(inner, "make_cache", None)  # models with sliding windows make their own

    def __call__(self, input_ids: mx.array, prompt_lengths: mx.array | None = None,
                 layer: int | None = None, cache: list | None = None, rows: mx.array | None = None) -> mx.array:
        if layer is not None:
            raise TwintuneError(f"features from an inner layer (task.layer) need a GPT-Neo model; this {self.model_type!r} "
                                "model gives its final hidden states only (task.layer -1).")
        hidden = self.model(input_ids, cache=cache)  # no method on these models acts on prompt positions
        return hidden if rows is None else hidden.reshape(-1, hidden.shape[-1])[rows]

    def make_cache(self) -> list:
        """mlx-lm's own key/value caches for the model, one per layer, for generation."""
        from mlx_lm.models.cache import KVCache

        return self._cache_maker() if self._cache_maker is not None else [KVCache() for _ in self.model.layers]

    def logits(self, hidden: mx.array) -> mx.array:
        if self.score is not None:  # a classification head: class scores
            return self.score(hidden)
        if "lm_head" in self:
            return self.lm_head(hidden)
        return self.output_layer().as_linear(hidden)

    def output_layer(self) -> nn.Module:
        """The module `logits` projects with (no head): lm_head, or the tied token embedding."""
        if "lm_head" in self:
            return self.lm_head
        embedding = getattr(self.model, "embed_tokens", None) or getattr(self.model, "wte", None)
        if embedding is None:
            raise TwintuneError(f"mlx-lm model {self.model_type!r}: no output layer found (lm_head, embed_tokens or wte).")
        return embedding


@partial(mx.compile, shapeless=True)
def _swiglu_and_slopes(gate: mx.array, up: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    sigmoid = mx.sigmoid(gate)
    silu = gate * sigmoid  # nn.silu, as mlx-lm's swiglu computes it
    return silu * up, up * (sigmoid + silu * (1 - sigmoid)), silu


@mx.custom_function
def _swiglu_keeping_slopes(gate: mx.array, up: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    return _swiglu_and_slopes(gate, up)


@_swiglu_keeping_slopes.vjp
def _swiglu_vjp(primals, cotangents, outputs):
    _, gate_slope, up_slope = outputs
    return cotangents[0] * gate_slope, cotangents[0] * up_slope


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up for training: the forward pass also computes the two slopes the backward needs
    (d/dgate and d/dup), and the backward keeps only those two (tokens, intermediate) arrays per
    block. Differentiating mlx-lm's compiled swiglu keeps four (gate, sigmoid, silu, up); recomputing
    from gate and up instead would keep two but run the sigmoid twice, the slowest elementwise op on
    a CPU (25 ms for 488 x 3072 values here, a matmul's worth)."""
    return _swiglu_keeping_slopes(gate, up)[0]


class SwiGLUMLP(nn.Module):
    """down_proj(swiglu(gate_proj(x), up_proj(x))) with the lean swiglu; the MLP's own members in
    their order, so weights, LoRA targets and saved adapters do not change."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for name, member in mlp.items():
            setattr(self, name, member)

    def __call__(self, x: mx.array) -> mx.array:
        act = swiglu if self.training else activations.swiglu  # evaluation and generation keep no slopes
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


_SWIGLU_FORWARD = "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))"


@lru_cache(maxsize=None)
def _is_swiglu_mlp(cls: type) -> bool:
    """Whether `cls.__call__(self, x)` is exactly mlx-lm's swiglu MLP (llama, qwen2, qwen3, mistral,
    ... share the line), read from its source: only those are swapped for SwiGLUMLP."""
    call = cls.__dict__.get("__call__")
    if call is None or list(inspect.signature(call).parameters) != ["self", "x"]:
        return False
    try:
        lines = [line.strip() for line in inspect.getsource(call).splitlines()[1:] if line.strip()]
    except (OSError, TypeError):
        return False
    return lines == [_SWIGLU_FORWARD] and getattr(sys.modules.get(cls.__module__), "swiglu", None) is activations.swiglu


def lean_swiglu_mlps(model: nn.Module) -> nn.Module:
    """The model with every swiglu MLP (see _is_swiglu_mlp) replaced by SwiGLUMLP, in place."""
    swapped = [(name, SwiGLUMLP(module)) for name, module in model.named_modules() if _is_swiglu_mlp(type(module))]
    if swapped:
        model.update_modules(tree_unflatten(swapped))
    return model


@dataclass(frozen=True)
class MLXLMSpec:
    """What the shared code asks of a model spec, read off a wrapped mlx-lm model."""

    vocab_size: int
    layers: tuple[tuple[str, tuple[int, int]], ...]
    max_positions: int = 2**31 - 1
    hidden_size: int = 0  # the width of the final hidden states (a head's input)
    weights: tuple[tuple[str, tuple[int, ...]], ...] = ()  # every parameter: name -> shape

    blocks: ClassVar[str] = "layers"  # mlx-lm's families' block list (PEFT's layers_pattern)

    @classmethod
    def of(cls, model: MLXLMModel) -> "MLXLMSpec":
        # every linear layer inside the transformer blocks, as (out_features, in_features)
        linear = [(name, tuple(module.weight.shape)) for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and (".layers." in name or ".h." in name)]
        vocab = model.logits(mx.zeros((1, 1, _hidden_size(model)))).shape[-1]
        shapes = tuple((name, tuple(value.shape)) for name, value in tree_flatten(model.parameters()))
        return cls(vocab_size=vocab, layers=tuple(sorted(linear, key=lambda item: _natural_key(item[0]))),
                   max_positions=model.max_positions or 2**31 - 1, weights=shapes, hidden_size=_hidden_size(model))

    @property
    def LINEAR_NAMES(self) -> tuple[str, ...]:  # noqa: N802 (the same name as GPTNeoSpec's constant)
        return tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in self.layers))

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        return dict(self.layers)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape by name (what full fine-tuning and BitFit train)."""
        return dict(self.weights)

    @property
    def num_layers(self) -> int:
        from twintune.methods.base import block_index

        return 1 + max(block_index(name) for name, _ in self.layers)


def _hidden_size(model: MLXLMModel) -> int:
    weights = dict(tree_flatten(model.parameters()))
    embedding = next(v for k, v in weights.items() if k.endswith(("embed_tokens.weight", "wte.weight")))
    return embedding.shape[-1]


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def load_mlx_lm_model(path: str | Path) -> MLXLMModel:
    """Load a model directory mlx-lm can read (config.json + safetensors) and wrap it.

    A directory such as ~/models/Qwen2.5-0.5B (config.json, safetensors, tokenizer) then trains
    through `MLXBackend.from_model(load_mlx_lm_model(directory))` (tests/test_mlx_lm_models.py).
    """
    from mlx_lm.utils import load_model

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise TwintuneError(f"model directory {path} has no config.json.")
    if not list(path.glob("*.safetensors")):
        raise TwintuneError(f"model directory {path} has no safetensors weights.")
    try:
        inner, _ = load_model(path)
    except ValueError as error:  # mlx-lm's answer to an unknown model_type
        raise TwintuneError(f"mlx-lm cannot load {path}: {error}") from None
    return MLXLMModel(inner)
