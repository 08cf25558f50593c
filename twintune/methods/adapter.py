"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) as AdapterHub places them.

A bottleneck is `up(act(down(h)))`: `down` projects the hidden size D to D // reduction_factor,
`up` projects back. Where it sits and what it reads follow AdapterHub (`adapters` 1.2) on its
GPT-2 block, the pre-LayerNorm block GPT-Neo shares: the block calls
`bottleneck_layer_forward(sublayer_output, residual, layer_norm=None)`, which runs the adapter's
`pre_forward`, `forward` and `post_forward` (methods/bottleneck.py, methods/modeling.py). With
x the residual stream entering the sublayer and s the sublayer's output (attention or MLP):

- `pre_forward`: `residual_before_ln=True` keeps s as the adapter's residual; with
  `original_ln_before=True` (SeqBnConfig) the adapter reads s + x (no LayerNorm is passed, so
  none is applied), else (DoubleSeqBnConfig) it reads s;
- `forward`: `dropout(up(act(down(input))) * scaling) + s`, scaling 1.0, no gating, no adapter
  LayerNorms (`ln_before`, `ln_after` False);
- `post_forward`: `original_ln_after=True` adds x (again no LayerNorm).

So each style computes, in every chosen block:

    houlsby  (DoubleSeqBnConfig: reduction_factor 16, swish), after the attention and after the MLP:
        x + s + dropout(up(act(down(s))))
    pfeiffer (SeqBnConfig: reduction_factor 16, relu), after the MLP only:
        r = x + s;  r + dropout(up(act(down(r))))

Dropout is where AdapterHub's `dropout` is: on the bottleneck's output, before the residual
additions (the shared generator's masks, one stream per adapter).

Initialisation: AdapterHub's `mam_adapter` (down: kaiming-uniform, bound 1/sqrt(D), zero bias;
up: zero weight and bias). Its default `bert` (N(0, 0.02) for both projections) adds a random
function to every block's residual stream from the first step, so an adapted model would not
start as the base model; with `up` at zero every adapter adds exactly 0 and training starts at
the base model, as LoRA's zero B does (down still learns from the second step on, once up is
no longer zero).

Non-linearities are AdapterHub's names for transformers' activations: relu, swish (= silu),
gelu_new (tanh approximation, GPT-Neo's own) and tanh. The erf `gelu` is not offered: MLX's
erf is float32-accurate on float64 arrays, which would break float64 parity.

Layout: twintune's own (AdapterHub has no GPT-Neo): adapter_config.json with
`twintune_method: adapter` and the keys, and adapter_model.safetensors with, per adapted
sublayer of block N (`attn_adapter`: Houlsby's first adapter; `mlp_adapter`: both styles'):

    transformer.h.N.mlp_adapter.down.weight   (D // reduction_factor, D)
    transformer.h.N.mlp_adapter.down.bias     (D // reduction_factor,)
    transformer.h.N.mlp_adapter.up.weight     (D, D // reduction_factor)
    transformer.h.N.mlp_adapter.up.bias       (D,)

A non-linearity sits between down and up, so no base weight can hold an adapter: it cannot
be merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.methods.base import (INSERT, BaseModel, Comparison, Layer, Method, Plan, Surgery, chosen_blocks,
                                   gpt_neo_slots)

# style -> (the slots its adapters fill in each block, whether they read the residual stream
# (pfeiffer: s + x) rather than the sublayer's output s, its non-linearity)
STYLES = {
    "houlsby": (("attn_adapter", "mlp_adapter"), False, "swish"),
    "pfeiffer": (("mlp_adapter",), True, "relu"),
}
# the names a recipe may give -> the function the backends compute (silu is swish)
NON_LINEARITIES = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu_new": "gelu_new", "tanh": "tanh"}


@dataclass(frozen=True, eq=False)
class BottleneckLayer(Layer):
    """A bottleneck up(act(down(h))) added to a sublayer's output; `reads_stream`: it reads the
    residual stream after the sublayer (Houlsby) rather than the sublayer's output."""

    non_linearity: str
    dropout: float
    reads_stream: bool


@dataclass(frozen=True)
class BottleneckAdapter(Method):
    """Bottleneck adapters after each block's attention and MLP (Houlsby) or its MLP only (Pfeiffer).

    Example:
        >>> plan = BottleneckAdapter(style="pfeiffer").plan(base, seed=0)   # D=64: a bottleneck of 4
        >>> plan.initial_values()["transformer.h.0.mlp_adapter.down.weight"].shape
        (4, 64)
        >>> plan.trainable_parameters()   # 4 blocks x (64*4 + 4 + 4*64 + 64)
        2320
    """

    style: str = "houlsby"
    reduction_factor: float = 16.0
    non_linearity: str = "default"  # the style's: swish for houlsby, relu for pfeiffer
    dropout: float = 0.0
    layers: list[int] = ()  # the blocks that get adapters; empty: all

    name: ClassVar[str] = "adapter"
    listed: ClassVar[int] = 6  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "bottleneck adapter"
    description: ClassVar[str] = ("bottleneck adapters after the attention and MLP (style houlsby) or the MLP "
                                  "(style pfeiffer), as AdapterHub's DoubleSeqBn and SeqBn")
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("adapter", "module methods", {"style": "houlsby", "reduction_factor": 4}, 1e-2),
        Comparison("adapter_pfeiffer", "module methods", {"style": "pfeiffer", "reduction_factor": 2}, 3e-3, default=False),
    )

    def kept_for_backward(self, shapes, linear) -> tuple[set[str], float]:
        """Each adapter's input, and its bottleneck before and after the nonlinearity."""
        inputs, extra = super().kept_for_backward(shapes, linear)
        extra += sum(shape[1] + 2 * shape[0] for name, shape in shapes.items() if name.endswith("_adapter.down.weight"))
        return inputs, extra

    def validate(self) -> None:
        check(self.style in STYLES, f"recipe key 'method.style' must be houlsby or pfeiffer, got {self.style!r}.")
        check(self.non_linearity == "default" or self.non_linearity in NON_LINEARITIES,
              f"recipe key 'method.non_linearity' must be one of default (the style's), "
              f"{', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}.")
        check(self.reduction_factor > 0,
              f"recipe key 'method.reduction_factor' must be positive, got {self.reduction_factor}.")
        check(0 <= self.dropout < 1, f"recipe key 'method.dropout' must be in [0, 1), got {self.dropout}.")
        check(all(i >= 0 for i in self.layers),
              f"recipe key 'method.layers' must list block numbers >= 0, got {list(self.layers)}.")

    @property
    def activation(self) -> str:
        """The non-linearity the backends compute."""
        return STYLES[self.style][2] if self.non_linearity == "default" else NON_LINEARITIES[self.non_linearity]

    def bottleneck(self, hidden_size: int) -> int:
        size = int(hidden_size // self.reduction_factor)
        if size < 1:
            raise TwintuneError(f"method.reduction_factor={self.reduction_factor:g} leaves no bottleneck for this "
                                f"model's hidden size {hidden_size} (hidden_size // reduction_factor must be at "
                                f"least 1).")
        return size

    def plan(self, base: BaseModel, seed: int) -> Plan:
        spec = gpt_neo_slots(self.name, base.spec, "the blocks' attn_adapter and mlp_adapter")
        hidden = spec.hidden_size
        bottleneck = self.bottleneck(hidden)
        slots, reads_stream, _ = STYLES[self.style]
        layer = BottleneckLayer(self.activation, self.dropout, reads_stream)
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(hidden)  # kaiming-uniform with a=sqrt(5), as AdapterHub's mam_adapter init
        surgeries = []
        for block in chosen_blocks(self.layers, spec.num_layers):
            for slot in slots:
                target = f"transformer.h.{block}.{slot}"
                values = {
                    f"{target}.down.weight": rng.uniform(-bound, bound, (bottleneck, hidden)).astype(np.float32),
                    f"{target}.down.bias": np.zeros(bottleneck, np.float32),
                    f"{target}.up.weight": np.zeros((hidden, bottleneck), np.float32),
                    f"{target}.up.bias": np.zeros(hidden, np.float32),
                }
                surgeries.append(Surgery(INSERT, target, values, layer))
        return Plan(self.name, tuple(surgeries))

    @property
    def weight_kinds(self) -> str:
        return "bottleneck adapter down/up"

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise TwintuneError(f"method adapter cannot be merged into the base model: its bottlenecks apply "
                            f"{self.activation} between the down- and the up-projection, which no weight of the "
                            f"base model can hold.")
