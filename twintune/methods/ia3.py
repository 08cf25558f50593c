"""IA3 (Liu et al., 2022): learned vectors that scale chosen layers' outputs, or their inputs.

A layer in `feedforward_modules` has its input scaled (`ia3_l` of shape (1, in)); any other
target has its output scaled, bias included (`ia3_l` of shape (out, 1)). Vectors start at one,
so training starts at the base model. PEFT's default for gpt_neo is q_proj, v_proj and c_proj with
c_proj feed-forward (the paper's choice is k, v and the MLP). PEFT layout: `<layer>.ia3_l`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Union

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.methods.base import (ALL_LINEAR, WRAP, BaseModel, Comparison, Layer, Method, Plan, Surgery,
                                   dense_weights, select_layers)


@dataclass(frozen=True, eq=False)
class IA3Layer(Layer):
    """A linear layer whose output (or, `feedforward`, whose input) a learned vector scales."""

    feedforward: bool


@dataclass(frozen=True)
class IA3(Method):
    """Infused adapter by inhibiting and amplifying inner activations.

    Example:
        >>> plan = IA3().plan(base, seed=0)   # q_proj, v_proj (outputs) and mlp.c_proj (input)
        >>> plan.initial_values()["transformer.h.0.mlp.c_proj.ia3_l"].shape
        (1, 256)
    """

    target_modules: Union[list[str], str] = ("q_proj", "v_proj", "c_proj")
    feedforward_modules: Union[list[str], str] = ("c_proj",)

    name: ClassVar[str] = "ia3"
    listed: ClassVar[int] = 2  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "IA3"
    parts: ClassVar[tuple[str, ...]] = ("ia3_l",)
    description: ClassVar[str] = "learned vectors scaling attention outputs and feed-forward inputs (PEFT IA3)"
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("ia3", "weight methods", {"target_modules": ALL_LINEAR, "feedforward_modules": ["c_proj"]}, 0.05),
    )
    layout: ClassVar[str] = "peft"
    peft_type: ClassVar[str] = "IA3"

    def kept_for_backward(self, shapes, linear) -> tuple[set[str], float]:
        """An output scale keeps the output it multiplies; an input scale (feed-forward) the layer's input."""
        inputs, extra = super().kept_for_backward(shapes, linear)
        for name, shape in shapes.items():
            layer, _, part = name.rpartition(".")
            if part == "ia3_l" and shape[1] == 1:
                extra += linear[layer][0]
            elif part == "ia3_l":
                inputs.add(layer)
        return inputs, extra

    def validate(self) -> None:
        check(bool(self.target_modules), "recipe key 'method.target_modules' must not be empty.")

    def layers(self, linear_layers) -> tuple[list[str], set[str]]:
        """(the scaled layers, those of them whose input is scaled)."""
        targets = select_layers(linear_layers, self.target_modules, "IA3")
        feedforward = set(select_layers(linear_layers, self.feedforward_modules, "IA3", "feedforward_modules")
                          if self.feedforward_modules else [])
        outside = sorted(feedforward - set(targets))
        if outside:
            raise TwintuneError(f"IA3 feedforward_modules must be a subset of target_modules (as in PEFT); "
                                f"{outside[0]} is not a target.")
        return targets, feedforward

    def plan(self, base: BaseModel, seed: int) -> Plan:
        linear = base.spec.linear_layers()
        targets, feedforward = self.layers(linear)
        surgeries = []
        for layer in targets:
            out_features, in_features = linear[layer]
            shape = (1, in_features) if layer in feedforward else (out_features, 1)
            values = {f"{layer}.ia3_l": np.ones(shape, np.float32)}
            surgeries.append(Surgery(WRAP, layer, values, IA3Layer(feedforward=layer in feedforward)))
        return Plan(self.name, tuple(surgeries))

    @classmethod
    def from_adapter_config(cls, config: dict, where) -> "IA3":
        """IA3 from a PEFT adapter_config.json, refusing options it cannot express."""
        for option, off in (("fan_in_fan_out", False), ("modules_to_save", None), ("exclude_modules", None)):
            value = config.get(option)
            if value not in (None, off, [], {}):
                raise TwintuneError(f"adapter {where} sets {option}={value!r}, which twintune's IA3 does not support.")
        def names(option, default):
            value = config.get(option, default)
            value = default if value is None else value
            if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                return value if isinstance(value, str) else tuple(sorted(set(value)))
            raise TwintuneError(f"adapter {where} has {option}={value!r}; it must be a list of module names or one regex.")
        return cls(target_modules=names("target_modules", list(cls.target_modules)),
                   feedforward_modules=names("feedforward_modules", list(cls.feedforward_modules)))

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An output vector scales the weight's rows and the bias; an input vector the weight's columns."""
        merged = dense_weights(base)
        for name, vector in state.items():
            layer = name.removesuffix(".ia3_l")
            merged[f"{layer}.weight"] = (merged[f"{layer}.weight"] * vector).astype(np.float32)
            if vector.shape[1] == 1 and f"{layer}.bias" in merged:
                merged[f"{layer}.bias"] = (merged[f"{layer}.bias"] * vector[:, 0]).astype(np.float32)
        return merged

    def adapter_config(self, base_model_name: str) -> dict:
        listed = lambda v: v if isinstance(v, str) else sorted(v)
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
                "target_modules": listed(self.target_modules), "feedforward_modules": listed(self.feedforward_modules),
                "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None, "inference_mode": True}
