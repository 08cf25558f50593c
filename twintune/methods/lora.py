"""LoRA (Hu et al., 2021): W x + (alpha / r) B A dropout(x), with PEFT's options.

Adapter weights use PEFT's layout: lora_A is (r, in_features), lora_B is (out_features, r).
Options as PEFT names them: `rank_pattern` / `alpha_pattern` (per-layer r and alpha; a key is a
regex matched against the end of a layer name), `layers_to_transform` (some blocks only); and
LoRA+'s `lr_ratio_b` (B learns at ratio x the step's learning rate; Hayou et al., 2024).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Union

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.models import GPTNeoSpec
from twintune.methods.base import (ALL_LINEAR, WRAP, BaseModel, Comparison, Layer, Method, Plan, Surgery, block_index,
                                   dense_weights, select_layers)


@dataclass(frozen=True, eq=False)
class LoRALayer(Layer):
    """A linear layer with a low-rank path beside it: y = W x + scale * B A dropout(x)."""

    scale: float
    dropout: float


@dataclass(frozen=True)
class LoRA(Method):
    """Low-rank adaptation of chosen linear layers.

    Example:
        >>> lora = LoRA(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
        >>> plan = lora.plan(base, seed=0)   # base: the built-in tiny GPT-Neo (4 blocks of width 64)
        >>> plan.trainable_parameters()
        8192
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[list[str], str] = ("q_proj", "v_proj")
    rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] = ()
    lr_ratio_b: float = 1.0

    name: ClassVar[str] = "lora"
    listed: ClassVar[int] = 0  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "LoRA"
    parts: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")
    description: ClassVar[str] = "low-rank update B A on chosen linear layers (PEFT LoRA; rsLoRA, LoRA+ and per-layer ranks)"
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("lora", "weight methods", {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR}, 4e-3),
    )
    layout: ClassVar[str] = "peft"
    peft_type: ClassVar[str] = "LORA"
    mlx_lm_format: ClassVar[bool] = True

    def kept_for_backward(self, shapes, linear) -> tuple[set[str], float]:
        """Each adapted layer's input and its rank-sized low-rank activation."""
        inputs, extra = super().kept_for_backward(shapes, linear)
        for name, shape in shapes.items():
            if name.endswith(".lora_A.weight"):
                inputs.add(name[: -len(".lora_A.weight")])
                extra += shape[0]
        return inputs, extra

    def validate(self) -> None:
        check(self.r > 0, f"recipe key 'method.r' must be a positive rank, got {self.r}.")
        check(self.alpha > 0, f"recipe key 'method.alpha' must be positive, got {self.alpha}.")
        check(0 <= self.dropout < 1, f"recipe key 'method.dropout' must be in [0, 1), got {self.dropout}.")
        check(bool(self.target_modules), "recipe key 'method.target_modules' must not be empty.")
        for key, r in self.rank_pattern.items():
            check(r > 0, f"recipe key 'method.rank_pattern.{key}' must be a positive rank, got {r}.")
        for key, alpha in self.alpha_pattern.items():
            check(alpha > 0, f"recipe key 'method.alpha_pattern.{key}' must be positive, got {alpha}.")
        check(self.lr_ratio_b > 0, f"recipe key 'method.lr_ratio_b' must be positive, got {self.lr_ratio_b}.")
        check(all(i >= 0 for i in self.layers_to_transform),
              f"recipe key 'method.layers_to_transform' must list block numbers >= 0, got {list(self.layers_to_transform)}.")

    @property
    def scale(self) -> float:
        return self.layer_scale(self.r, self.alpha)

    def layer_scale(self, r: int, alpha: float) -> float:
        # rsLoRA (Kalajdzievski, 2023) divides by sqrt(r) so larger ranks keep learning.
        return alpha / (math.sqrt(r) if self.rslora else r)

    def _pattern(self, pattern: Mapping, layer: str, default):
        """PEFT's rule (utils.other.get_pattern_key): the first key that matches the end of the name."""
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", layer):
                return value
        return default

    def rank(self, layer: str) -> int:
        return self._pattern(self.rank_pattern, layer, self.r)

    def layer_alpha(self, layer: str) -> float:
        return self._pattern(self.alpha_pattern, layer, self.alpha)

    def targets(self, linear_layers: dict[str, tuple[int, int]]) -> list[str]:
        """The adapted layers: a regex is matched against the full name; names match a name's last parts (as in PEFT)."""
        chosen = select_layers(linear_layers, self.target_modules, "LoRA")
        if self.layers_to_transform:
            blocks = {block_index(n) for n in linear_layers} - {None}
            missing = sorted(set(self.layers_to_transform) - blocks)
            if missing:
                raise TwintuneError(f"method.layers_to_transform names block {missing[0]}, but this model has blocks "
                                    f"0-{max(blocks)}.")
            chosen = [n for n in chosen if block_index(n) in set(self.layers_to_transform)]
        for option, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in pattern:
                if not any(re.match(rf"(.*\.)?({key})$", n) for n in chosen):
                    raise TwintuneError(f"method.{option} key {key!r} names no adapted layer; the adapted layers "
                                        f"end in {', '.join(sorted({n.rsplit('.', 1)[-1] for n in chosen}))}.")
        for name in chosen:
            out_features, in_features = linear_layers[name]
            r = self.rank(name)
            if r > min(out_features, in_features):
                raise TwintuneError(f"LoRA rank r={r} is larger than layer {name} ({out_features}x{in_features}) allows.")
        return chosen

    def init_values(self, linear_layers: dict[str, tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
        """A drawn kaiming-uniform (a=sqrt(5), as PEFT/torch do: bound 1/sqrt(in)), B zeros."""
        rng = np.random.default_rng(seed)
        values = {}
        for name in self.targets(linear_layers):
            out_features, in_features = linear_layers[name]
            bound = 1.0 / math.sqrt(in_features)
            r = self.rank(name)
            values[f"{name}.lora_A.weight"] = rng.uniform(-bound, bound, (r, in_features)).astype(np.float32)
            values[f"{name}.lora_B.weight"] = np.zeros((out_features, r), np.float32)
        return values

    def plan(self, base: BaseModel, seed: int) -> Plan:
        values = self.init_values(base.spec.linear_layers(), seed)
        surgeries = tuple(self._surgery(base, layer, values) for layer in adapted_layers(values))
        lr_scales = {n: self.lr_ratio_b for n in values if ".lora_B." in n} if self.lr_ratio_b != 1.0 else {}
        return Plan(self.name, surgeries, lr_scales)

    def _surgery(self, base: BaseModel, layer: str, values: dict[str, np.ndarray]) -> Surgery:
        mine = {k: v for k, v in values.items() if k.rsplit(".lora_", 1)[0] == layer}
        return Surgery(WRAP, layer, mine, LoRALayer(self.layer_scale(self.rank(layer), self.layer_alpha(layer)),
                                                     self.dropout))

    def layer_detail(self, layer: str) -> str:
        return f" with r={self.rank(layer)}"

    @classmethod
    def reads_adapter_config(cls, config: dict) -> bool:
        """PEFT's LORA without `use_dora: true` (DoRA reads that one; a bad value is refused here)."""
        return super().reads_adapter_config(config) and config.get("use_dora") is not True

    @classmethod
    def from_adapter_config(cls, config: dict, where) -> "LoRA":
        """This class from a PEFT adapter_config.json, refusing options it cannot express."""
        return lora_from_peft_config(config, where, cls)

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Base weights with W + scale * B @ A folded in, in float32 (NF4 layers dequantized first:
        re-quantizing would round the update away).

        Example:
            >>> lora = LoRA(r=4)
            >>> trained = {k: v + 0.01 for k, v in lora.plan(base, seed=0).initial_values().items()}
            >>> merged = lora.merge(base, trained)
            >>> bool(np.abs(merged["transformer.h.0.attn.attention.q_proj.weight"]
            ...             - base.weights["transformer.h.0.attn.attention.q_proj.weight"]).max() > 0)
            True
        """
        merged = dense_weights(base)
        for layer in adapted_layers(state):
            a, b = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"]
            scale = np.float32(self.layer_scale(a.shape[0], self.layer_alpha(layer)))
            merged[f"{layer}.weight"] = merged[f"{layer}.weight"] + scale * (b @ a).astype(np.float32)
        return merged

    def adapter_config(self, base_model_name: str) -> dict:
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": sorted(self.layers_to_transform) or None,
            "layers_pattern": "h" if self.layers_to_transform else None,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_dora": self.name == "dora",
        }


def adapted_layers(values: Mapping[str, np.ndarray]) -> list[str]:
    """The layer names in a dict of LoRA values (`...q_proj.lora_A.weight` -> `...q_proj`)."""
    return sorted({name.rsplit(".lora_", 1)[0] for name in values if ".lora_" in name})


_PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")  # what PEFT picks for gpt_neo when target_modules is unset
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # inits that leave the base weights as they are
# PEFT options that change what an adapter means (beyond plain LoRA on the listed layers):
# option -> (value that means "off", what the option is, for the message).
_UNSUPPORTED_OPTIONS = {
    "fan_in_fan_out": (False, "transposed (Conv1D-style) weights"),
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a bias on lora_B"),
    "modules_to_save": (None, "fully trained extra modules"),
    "exclude_modules": (None, "excluded modules"),
    "trainable_token_indices": (None, "trained token embeddings"),
    "layer_replication": (None, "replicated layers"),
    "target_parameters": (None, "adapted parameters"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "megatron_config": (None, "Megatron layers"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "velora_config": (None, "VeLoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
}


def _is_off(value, off) -> bool:
    """Whether an option is at its neutral value (null, or an empty list/dict, counts as unset)."""
    if value is None or (isinstance(value, (list, dict, str)) and not value):
        return True
    return type(value) is type(off) and value == off


def lora_from_peft_config(config: dict, where, cls: type[LoRA] = LoRA) -> LoRA:
    """Our LoRA (or a subclass: DoRA) from a PEFT adapter_config.json dict, refusing what it cannot express."""
    for option, (off, meaning) in _UNSUPPORTED_OPTIONS.items():
        value = config.get(option, off)
        if not _is_off(value, off):
            raise TwintuneError(f"adapter {where} sets {option}={value!r} ({meaning}), which twintune does not "
                                f"support.")
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        raise TwintuneError(f"adapter {where} sets init_lora_weights={init!r}, which changes the base model's "
                            "weights; convert it to a plain LoRA adapter first (PEFT's "
                            "path_initial_model_for_weight_conversion).")

    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise TwintuneError(f"adapter {where} has rank r={r!r}; it must be a positive integer.")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise TwintuneError(f"adapter {where} has lora_alpha={alpha!r}; it must be a positive number.")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise TwintuneError(f"adapter {where} has lora_dropout={dropout!r}; it must be in [0, 1).")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise TwintuneError(f"adapter {where} has use_rslora={rslora!r}; it must be true or false.")

    targets = config.get("target_modules")
    if targets is None:
        targets = _PEFT_DEFAULT_TARGETS
    elif targets == "all-linear":
        targets = GPTNeoSpec.LINEAR_NAMES
    elif isinstance(targets, str):
        pass  # a regex, matched against the full layer name as PEFT does
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets = tuple(sorted(set(targets)))
    else:
        raise TwintuneError(f"adapter {where} has target_modules={targets!r}; it must be a list of module "
                            "names or one regex.")
    patterns = {}
    for option, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = config.get(option) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, kind) and not isinstance(v, bool) and v > 0
                                                    for v in pattern.values()):
            raise TwintuneError(f"adapter {where} has {option}={pattern!r}; it must map layer names to positive numbers.")
        patterns[option] = pattern
    layers = config.get("layers_to_transform") or []
    layers = [layers] if isinstance(layers, int) else layers
    if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise TwintuneError(f"adapter {where} has layers_to_transform={layers!r}; it must list block numbers.")
    pattern_name = config.get("layers_pattern")
    if layers and pattern_name not in (None, "h", ["h"], "layers", ["layers"]):  # load_adapter checks the model's
        raise TwintuneError(f"adapter {where} has layers_pattern={pattern_name!r}; twintune's models' blocks are 'h' "
                            "(GPT-Neo) or 'layers' (mlx-lm's families).")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise TwintuneError(f"adapter {where} has use_dora={use_dora!r}; it must be true or false.")
    return cls(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets, rslora=rslora,
               rank_pattern=patterns["rank_pattern"], alpha_pattern={k: float(v) for k, v in patterns["alpha_pattern"].items()},
               layers_to_transform=tuple(sorted(layers)))


