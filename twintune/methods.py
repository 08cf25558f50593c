"""PEFT methods as backend-neutral specs: what to adapt, and the initial values, drawn once in numpy.

Both backends receive the same initial arrays, so they start from the same numbers. Adapter
weights use PEFT's layout: lora_A is (r, in_features), lora_B is (out_features, r).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from twintune.errors import TwintuneError
from twintune.quant.nf4 import NF4Tensor, dequantize_nf4


@dataclass(frozen=True)
class LoRA:
    """Low-rank adaptation (Hu et al., 2021): W x + scale * B A dropout(x).

    Example:
        >>> lora = LoRA(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
        >>> init = lora.init_values(spec.linear_layers(), seed=0)
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    rslora: bool = False
    name: str = field(default="lora", init=False)

    @property
    def scale(self) -> float:
        # rsLoRA (Kalajdzievski, 2023) divides by sqrt(r) so larger ranks keep learning.
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def targets(self, linear_layers: dict[str, tuple[int, int]]) -> list[str]:
        """The adapted layers: a regex is matched against the full name; names match a name's last parts (as in PEFT)."""
        if isinstance(self.target_modules, str):
            chosen = [n for n in linear_layers if re.fullmatch(self.target_modules, n)]
            wanted = f"regex {self.target_modules!r}"
        else:
            chosen = [n for n in linear_layers
                      if any(n == t or n.endswith("." + t) for t in self.target_modules)]
            unknown = [t for t in self.target_modules
                       if not any(n == t or n.endswith("." + t) for n in linear_layers)]
            if unknown:
                short = sorted({n.rsplit(".", 1)[-1] for n in linear_layers})
                raise TwintuneError(f"LoRA target module {unknown[0]!r} is not a linear layer of this model; "
                                    f"choose from {', '.join(short)}.")
            wanted = f"target modules {list(self.target_modules)}"
        if not chosen:
            raise TwintuneError(f"LoRA {wanted} matched no linear layer of this model.")
        for name in chosen:
            out_features, in_features = linear_layers[name]
            if self.r > min(out_features, in_features):
                raise TwintuneError(f"LoRA rank r={self.r} is larger than layer {name} "
                                    f"({out_features}x{in_features}) allows.")
        return chosen

    def init_values(self, linear_layers: dict[str, tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
        """A drawn kaiming-uniform (a=sqrt(5), as PEFT/torch do: bound 1/sqrt(in)), B zeros."""
        rng = np.random.default_rng(seed)
        values = {}
        for name in self.targets(linear_layers):
            out_features, in_features = linear_layers[name]
            bound = 1.0 / math.sqrt(in_features)
            values[f"{name}.lora_A.weight"] = rng.uniform(-bound, bound, (self.r, in_features)).astype(np.float32)
            values[f"{name}.lora_B.weight"] = np.zeros((out_features, self.r), np.float32)
        return values

    def merge(self, weights: dict[str, np.ndarray], adapter: dict[str, np.ndarray],
              quantized: dict[str, NF4Tensor] | None = None) -> dict[str, np.ndarray]:
        """Base weights with the adapter folded in: W + scale * B @ A, in float32.

        A layer that was trained on an NF4 base is dequantized first and the update added in
        float32, so the adapter is not rounded away by re-quantizing.

        Example:
            >>> merged = lora.merge(weights, run.backend.trainable_state(), quantized)
        """
        merged = dict(weights)
        for name, q in (quantized or {}).items():
            merged[f"{name}.weight"] = dequantize_nf4(q)
        for name in adapted_layers(adapter):
            a, b = adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"]
            base = merged[f"{name}.weight"].astype(np.float32)
            merged[f"{name}.weight"] = base + np.float32(self.scale) * (b @ a)
        return merged


def adapted_layers(values: dict[str, np.ndarray]) -> list[str]:
    """The layer names in a dict of LoRA values (`...q_proj.lora_A.weight` -> `...q_proj`)."""
    return sorted({name.rsplit(".lora_", 1)[0] for name in values})


METHODS = {"lora": LoRA}
