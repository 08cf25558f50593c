"""DoRA (Liu et al., 2024): LoRA's update, then each output row rescaled to a learned magnitude.

    W' = m * (W + s B A) / ||W + s B A||   (row norms; the norm is detached, as PEFT and mlx-lm do)

so y = base(x) + (g - 1) W x + g s B A x with g = m / ||W + s B A||. The magnitude vector m starts
at the base's row norms (B is zero), so training starts at the base model. PEFT layout:
`<layer>.lora_magnitude_vector`, `use_dora: true`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from twintune.errors import TwintuneError
from twintune.methods.base import ALL_LINEAR, BaseModel, Comparison, Plan, Surgery, dense_weights
from twintune.methods.lora import LoRA, LoRALayer, adapted_layers


def row_norms(weight: np.ndarray) -> np.ndarray:
    """Each output row's Euclidean norm, computed in float64 and rounded once."""
    return np.sqrt((weight.astype(np.float64) ** 2).sum(axis=1))


@dataclass(frozen=True, eq=False)
class DoRALayer(LoRALayer):
    """LoRA's layer with a learned magnitude per output row; `weight_norm_sq` is ||W||^2 per row of the
    frozen base weight, from which the layer's norm starts."""

    weight_norm_sq: np.ndarray


@dataclass(frozen=True)
class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation; the same keys as LoRA.

    Example:
        >>> plan = DoRA(r=8, target_modules=["q_proj", "v_proj"]).plan(base, seed=0)
        >>> plan.initial_values()["transformer.h.0.attn.attention.q_proj.lora_magnitude_vector"].shape
        (64,)
    """

    name: ClassVar[str] = "dora"
    listed: ClassVar[int] = 1  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "DoRA"
    parts: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    description: ClassVar[str] = "LoRA plus a learned magnitude per output row, the weight norm detached (PEFT use_dora)"
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("dora", "weight methods", {"r": 8, "alpha": 16, "target_modules": ALL_LINEAR}, 4e-3),
    )
    mlx_lm_format: ClassVar[bool] = False  # mlx-lm's DoRA layout is not written yet

    def kept_for_backward(self, shapes, linear) -> tuple[set[str], float]:
        """LoRA's, and the output each learned magnitude multiplies."""
        inputs, extra = super().kept_for_backward(shapes, linear)
        extra += sum(linear[name.rpartition(".")[0]][0] for name in shapes if name.endswith(".lora_magnitude_vector"))
        return inputs, extra

    @classmethod
    def reads_adapter_config(cls, config: dict) -> bool:
        """PEFT's LORA with `use_dora: true`."""
        return config.get("peft_type") == cls.peft_type and config.get("use_dora") is True

    def plan(self, base: BaseModel, seed: int) -> Plan:
        if base.quantization and base.quantization.type == "affine":
            raise TwintuneError("method dora needs the base weights' row norms, and MLX's affine-quantized layers "
                                "do not give them to twintune; use quantize.type nf4 (DoRA on NF4 is supported) or none.")
        lora = super().plan(base, seed)
        surgeries = []
        for s in lora.surgeries:
            norms = row_norms(base.linear_weight(s.target))
            values = {**s.values, f"{s.target}.lora_magnitude_vector": norms.astype(np.float32)}
            # ||W||^2 per row, constant while the base is frozen: the layer's norm starts from it
            surgeries.append(Surgery(s.kind, s.target, values, DoRALayer(s.layer.scale, s.layer.dropout, norms**2)))
        return Plan(self.name, tuple(surgeries), lora.lr_scales)

    def shapes(self, base: BaseModel) -> dict[str, tuple[int, ...]]:
        shapes = {n: v.shape for n, v in LoRA.plan(self, base, 0).initial_values().items()}
        for layer in adapted_layers(shapes):
            shapes[f"{layer}.lora_magnitude_vector"] = (base.spec.linear_layers()[layer][0],)
        return shapes

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """W' = m * (W + s B A) / ||W + s B A|| per row, as PEFT merges (bias unchanged)."""
        merged = dense_weights(base)
        for layer in adapted_layers(state):
            a, b = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"]
            scale = self.layer_scale(a.shape[0], self.layer_alpha(layer))
            updated = merged[f"{layer}.weight"].astype(np.float64) + scale * (b.astype(np.float64) @ a)
            magnitude = state[f"{layer}.lora_magnitude_vector"].astype(np.float64)
            merged[f"{layer}.weight"] = ((magnitude / row_norms(updated))[:, None] * updated).astype(np.float32)
        return merged
