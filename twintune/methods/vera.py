"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices A (r, in) and B (out, r) shared by
every adapted layer, and per layer two trained vectors that scale them:

    y = W x + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x))))

A and B are drawn once for the largest input and output among the adapted layers, and each layer
reads its slice, as PEFT does. lambda_d starts at `d_initial` and lambda_b at zero, so training
starts at the base model. PEFT layout: `<layer>.vera_lambda_d` (r), `<layer>.vera_lambda_b` (out),
and the projections as `base_model.vera_A` / `base_model.vera_B` (PEFT's `save_projection`).

The projections are PEFT's own numbers: PEFT draws them with torch's CPU generator seeded with
`projection_prng_key` (a Mersenne Twister, as numpy's legacy seeding is) and Kaiming-uniform
bounds, A first; `projections` makes the same 24-bit draws and the same float arithmetic in numpy,
bit for bit, so both backends, PEFT and an adapter saved without its projections agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Union

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.methods.base import (ALL_LINEAR, WRAP, BaseModel, Comparison, Layer, Method, Plan, Surgery,
                                   dense_weights, select_layers)


@dataclass(frozen=True, eq=False)
class Projections:
    """The shared frozen projections: one object for every adapted layer of a plan, so each backend
    converts them once and every layer reads a slice of the same arrays (PEFT keeps one vera_A and
    vera_B per model too; a copy per layer would cost 200 MB at r 256 on GPT-Neo 1.3B's q and v)."""

    vera_A: np.ndarray  # (r, largest in)
    vera_B: np.ndarray  # (largest out, r)


@dataclass(frozen=True, eq=False)
class VeRALayer(Layer):
    """A linear layer plus lambda_b * B (lambda_d * A dropout(x)); A and B are this layer's slices of the
    shared projections (A[:, :in_features], B[:out_features]), frozen."""

    dropout: float
    projections: Projections
    in_features: int
    out_features: int


def projections(key: int, r: int, largest_in: int, largest_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's vera_A (r, largest_in) and vera_B (largest_out, r): Kaiming-uniform (gain sqrt(2)) draws of
    torch's CPU generator seeded with `key`, reproduced in numpy bit for bit.

    Example:
        >>> a, b = projections(0, 4, 64, 256)
        >>> a.shape, b.shape, a.dtype.name
        ((4, 64), (256, 4), 'float32')
    """
    generator = np.random.MT19937()
    generator._legacy_seeding(key)  # init_genrand(key): what torch.Generator.manual_seed does
    draws = generator.random_raw(r * largest_in + largest_out * r).astype(np.uint32)

    def uniform(bits: np.ndarray, shape: tuple[int, int], fan_in: int) -> np.ndarray:
        bound = float(np.float32(math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)))  # torch takes it as float32
        unit = (bits & ((1 << 24) - 1)).astype(np.float64) * 2.0**-24  # torch: 24 random bits of each draw
        return (unit * (2 * bound) - bound).astype(np.float32).reshape(shape)

    split = r * largest_in
    return uniform(draws[:split], (r, largest_in), largest_in), uniform(draws[split:], (largest_out, r), r)


@dataclass(frozen=True)
class VeRA(Method):
    """Vector-based random matrix adaptation: two trained vectors per layer on shared frozen projections.

    Example:
        >>> plan = VeRA(r=16).plan(base, seed=0)   # q_proj and v_proj, PEFT's default for gpt_neo
        >>> plan.initial_values()["transformer.h.0.attn.attention.q_proj.vera_lambda_d"].shape
        (16,)
    """

    r: int = 256
    target_modules: Union[list[str], str] = ("q_proj", "v_proj")
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0

    name: ClassVar[str] = "vera"
    listed: ClassVar[int] = 3  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "VeRA"
    parts: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d")
    description: ClassVar[str] = ("trained vectors scaling frozen random projections shared by every adapted layer "
                                  "(PEFT VeRA)")
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("vera", "weight methods", {"r": 64, "target_modules": ALL_LINEAR}, 5e-2),
    )
    layout: ClassVar[str] = "peft"
    peft_type: ClassVar[str] = "VERA"
    file_names: ClassVar[Mapping[str, str]] = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}

    def validate(self) -> None:
        check(self.r > 0, f"recipe key 'method.r' must be > 0, got {self.r}.")
        check(bool(self.target_modules), "recipe key 'method.target_modules' must not be empty.")
        check(0 <= self.projection_prng_key < 2**32,
              f"recipe key 'method.projection_prng_key' must be from 0 to 2**32 - 1, got {self.projection_prng_key}.")
        check(0.0 <= self.dropout < 1.0, f"recipe key 'method.dropout' must be in [0, 1), got {self.dropout}.")

    def targets(self, linear: Mapping[str, tuple[int, int]]) -> list[str]:
        return select_layers(linear, self.target_modules, "VeRA")

    def frozen_values(self, spec) -> dict[str, np.ndarray]:
        """The shared projections, for the largest input and output among the adapted layers."""
        if spec is None:
            raise ValueError("VeRA's projections are sized by the model: give its spec")
        linear = spec.linear_layers()
        shapes = [linear[layer] for layer in self.targets(linear)]
        a, b = projections(self.projection_prng_key, self.r, max(i for _, i in shapes), max(o for o, _ in shapes))
        return {"vera_A": a, "vera_B": b}

    def plan(self, base: BaseModel, seed: int) -> Plan:
        """Deterministic: the projections come from projection_prng_key, not the run's seed."""
        linear = base.spec.linear_layers()
        shared = Projections(**self.frozen_values(base.spec))
        surgeries = []
        for layer in self.targets(linear):
            out_features, in_features = linear[layer]
            values = {f"{layer}.vera_lambda_b": np.zeros(out_features, np.float32),
                      f"{layer}.vera_lambda_d": np.full(self.r, self.d_initial, np.float32)}
            surgeries.append(Surgery(WRAP, layer, values, VeRALayer(self.dropout, shared, in_features, out_features)))
        return Plan(self.name, tuple(surgeries))

    def kept_for_backward(self, shapes, linear) -> tuple[set[str], float]:
        """Each adapted layer's input, A x and lambda_d * A x (r each), and B's output that lambda_b scales."""
        inputs, extra = super().kept_for_backward(shapes, linear)
        for name, shape in shapes.items():
            if name.endswith(".vera_lambda_b"):
                inputs.add(name.removesuffix(".vera_lambda_b"))
                extra += shape[0] + 2 * self.r
        return inputs, extra

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """W + (lambda_b B) (lambda_d A), each layer with its slices (PEFT's get_delta_weight)."""
        merged = dense_weights(base)
        shared = self.frozen_values(base.spec)
        for layer, (out_features, in_features) in base.spec.linear_layers().items():
            if f"{layer}.vera_lambda_b" not in state:
                continue
            b = state[f"{layer}.vera_lambda_b"][:, None] * shared["vera_B"][:out_features]
            a = state[f"{layer}.vera_lambda_d"][:, None] * shared["vera_A"][:, :in_features]
            merged[f"{layer}.weight"] = (merged[f"{layer}.weight"] + b @ a).astype(np.float32)
        return merged

    @classmethod
    def from_adapter_config(cls, config: dict, where) -> "VeRA":
        """VeRA from a PEFT adapter_config.json, refusing options it cannot express."""
        for option, off in (("fan_in_fan_out", False), ("bias", "none"), ("modules_to_save", None),
                            ("layers_to_transform", None), ("init_weights", True)):
            value = config.get(option, off)
            if value not in (None, off, [], {}):
                raise TwintuneError(f"adapter {where} sets {option}={value!r}, which twintune's VeRA does not support.")
        targets = config.get("target_modules") or list(cls.target_modules)
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise TwintuneError(f"adapter {where} has target_modules={targets!r}; it must be a list of module names "
                                "or one regex.")
        keys = {"r": config.get("r", cls.r), "projection_prng_key": config.get("projection_prng_key", 0),
                "d_initial": config.get("d_initial", cls.d_initial), "dropout": config.get("vera_dropout", 0.0)}
        if not isinstance(keys["r"], int) or isinstance(keys["r"], bool) or keys["r"] <= 0:
            raise TwintuneError(f"adapter {where} has r={keys['r']!r}; it must be a positive integer.")
        method = cls(target_modules=targets if isinstance(targets, str) else tuple(sorted(set(targets))), **keys)
        method.validate()
        return method

    def adapter_config(self, base_model_name: str) -> dict:
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {"peft_type": "VERA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
                "r": self.r, "target_modules": targets, "projection_prng_key": self.projection_prng_key,
                "save_projection": True, "vera_dropout": self.dropout, "d_initial": self.d_initial,
                "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_weights": True,
                "layers_to_transform": None, "layers_pattern": None, "inference_mode": True}
