"""What every method shares: the plan it returns, the base model it plans on, its recipe keys.

A method never touches a model. It says what to change (a Plan: surgeries, each naming what it
changes and the initial numpy values, drawn once from the seed), and both backends carry the plan
out (backends/X/surgery.py). Everything past that point (the loop, checkpoints, saving, the
memory estimate) sees only the plan's named values.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from twintune.errors import TwintuneError
from twintune.quant import Quantization
from twintune.quant.nf4 import NF4Tensor, dequantize_nf4

WRAP = "wrap"  # a linear layer gets a module around it: the surgery's `layer` (built by backends/X/methods/)
UNFREEZE = "unfreeze"  # a parameter of the base trains as it is
INSERT = "insert"  # a module (the surgery's `layer`) fills one of the model's empty slots, named by
# `target`: transformer.prompt, transformer.prefix, transformer.h.N.{attn_adapter,mlp_adapter,intervention}


@dataclass(frozen=True, eq=False)
class Layer:
    """What a WRAP or INSERT surgery builds, its settings as fields (a subclass per kind of module, in
    the method's own file). Each backend registers the module class that builds it
    (backends/X/methods/, `@builds(TheLayer)`), so a plan says what to build and never how."""


@dataclass(frozen=True)
class Surgery:
    """One change to the frozen model.

    `values` are the initial trainable values it adds (full names, as the backends name them);
    for UNFREEZE they are the parameter's own values. `layer` is the module a WRAP or INSERT builds."""

    kind: str
    target: str
    values: Mapping[str, np.ndarray]
    layer: Layer | None = None


@dataclass(frozen=True)
class Plan:
    """Everything a backend needs to turn the frozen base into the method's trainable model.

    Example:
        >>> from twintune.methods import LoRA
        >>> plan = LoRA(r=4).plan(base, seed=0)
        >>> sorted(plan.initial_values())[0]
        'transformer.h.0.attn.attention.q_proj.lora_A.weight'
    """

    method: str
    surgeries: tuple[Surgery, ...]
    lr_scales: Mapping[str, float] = field(default_factory=dict)  # name -> multiple of the step's lr (LoRA+)

    def initial_values(self) -> dict[str, np.ndarray]:
        return {name: value for s in self.surgeries for name, value in s.values.items()}

    def trainable_parameters(self) -> int:
        return int(sum(value.size for s in self.surgeries for value in s.values.values()))

    def released(self) -> "Plan":
        """The plan without the base's own arrays (UNFREEZE values become read-only zero-size-memory
        placeholders of the same shape): once the model holds them, keeping them would keep a second
        copy of every unfrozen weight alive for the whole run."""
        def light(s: Surgery) -> Surgery:
            if s.kind != UNFREEZE:
                return s
            values = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in s.values.items()}
            return Surgery(s.kind, s.target, values, s.layer)
        return Plan(self.method, tuple(light(s) for s in self.surgeries), self.lr_scales)

    def wrapped(self) -> dict[str, Surgery]:
        """Wrapped layer name -> its surgery."""
        return {s.target: s for s in self.surgeries if s.kind == WRAP}

    def unfrozen(self) -> list[str]:
        return [s.target for s in self.surgeries if s.kind == UNFREEZE]

    def inserted(self) -> dict[str, Surgery]:
        """Filled slot name -> its surgery."""
        return {s.target: s for s in self.surgeries if s.kind == INSERT}


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")  # GPT-Neo's block linear layers


@dataclass(frozen=True)
class Comparison:
    """One row `twintune compare` makes of a method: the entry's name, its family in the table and
    plot, the method's keys and the learning rate (tests/methods/test_method_learning.py measured
    them on the demo); `default`: in a compare that names no entries."""

    entry: str
    family: str
    keys: Mapping[str, Any]
    lr: float
    default: bool = True


@dataclass
class BaseModel:
    """The frozen model a method plans on: its spec, float weights (numpy) and NF4 layers.

    `weights` is any mapping of Hugging Face names to numpy arrays (an mlx-lm model lends its
    own, read when asked)."""

    spec: Any
    weights: Mapping[str, np.ndarray]
    quantized: Mapping[str, NF4Tensor] = field(default_factory=dict)
    quantization: Quantization | None = None
    dtype: str = "float32"
    tokenizer: Any = None  # the model's tokenizer (prompt tuning's `init: text` reads its words with it)

    def linear_weight(self, layer: str) -> np.ndarray:
        """A linear layer's weight as float32 (an NF4 layer dequantized: the weights it computes with)."""
        if layer in self.quantized:
            return dequantize_nf4(self.quantized[layer])
        return np.asarray(self.weights[f"{layer}.weight"], np.float32)


def short_names(names) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def select_layers(linear_layers: Mapping[str, tuple[int, int]], targets, what: str, option: str = "target_modules") -> list[str]:
    """Layers chosen by names (a name matches a layer name's last parts, as in PEFT) or by one
    regex matched against the full name. Unknown names and empty selections are refused."""
    if isinstance(targets, str):
        chosen = [n for n in linear_layers if re.fullmatch(targets, n)]
        if not chosen:
            raise TwintuneError(f"{what} {option} regex {targets!r} matched no linear layer of this model.")
        return chosen
    chosen = [n for n in linear_layers if any(n == t or n.endswith("." + t) for t in targets)]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_layers)]
    if unknown:
        raise TwintuneError(f"{what} target module {unknown[0]!r} is not a linear layer of this model; "
                            f"choose from {', '.join(short_names(linear_layers))}.")
    if not chosen:
        raise TwintuneError(f"{what} {option} {list(targets)} matched no linear layer of this model.")
    return chosen


def gpt_neo_slots(method: str, spec, slots: str):
    """`spec` if it is twintune's GPT-Neo, the model whose `slots` (named for the sentence) a method
    fills; any other model is refused."""
    from twintune.models import GPTNeoSpec

    if not isinstance(spec, GPTNeoSpec):
        raise TwintuneError(f"method {method} fills {slots}, slots that only twintune's GPT-Neo has; this model is not "
                            "a GPT-Neo, so choose a method that wraps linear layers (lora, dora, ia3).")
    return spec


def chosen_blocks(layers, num_layers: int) -> list[int]:
    """The blocks a method's `layers` key names, sorted (none named: every block); one past the model is refused."""
    past = sorted(i for i in layers if i >= num_layers)
    if past:
        raise TwintuneError(f"method.layers names block {past[0]}, but this model has {num_layers} blocks "
                            f"(0-{num_layers - 1}).")
    return sorted(set(layers)) if layers else list(range(num_layers))


def block_index(name: str) -> int | None:
    """The block a parameter or layer belongs to (`transformer.h.3.mlp.c_fc` -> 3), or None."""
    found = re.search(r"\.(?:h|layers)\.(\d+)\.", name)
    return int(found.group(1)) if found else None


class Method:
    """The interface of a method: a dataclass whose fields are its recipe keys (with defaults).

    Subclasses set `name`, `description` and `layout` ("peft": a PEFT adapter; "twintune": the
    trained tensors under the base's names; "checkpoint": a whole Hugging Face model), and implement
    `plan`. `merge` folds trained values into base weights; a method that cannot merge says so.
    """

    name: ClassVar[str]
    listed: ClassVar[int] = 100  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str]  # as a sentence names it: "LoRA", "BitFit"
    description: ClassVar[str]
    layout: ClassVar[str] = "twintune"
    peft_type: ClassVar[str | None] = None
    parts: ClassVar[tuple[str, ...] | None] = None  # the tensors a wrapped layer gets; None: base parameters
    mlx_lm_format: ClassVar[bool] = False  # `twintune export --format mlx-lm` can write it
    # our name of a value -> its name in an adapter file, where the layout's rule does not give it
    # (PEFT's prompt-learning methods save one `prompt_embeddings` with no module path)
    file_names: ClassVar[Mapping[str, str]] = {}
    comparisons: ClassVar[tuple[Comparison, ...]] = ()  # its rows in `twintune compare`

    def validate(self) -> None:
        """Range checks on the keys (types are checked when the recipe is read)."""

    def plan(self, base: BaseModel, seed: int) -> Plan:
        raise NotImplementedError

    def shapes(self, base: BaseModel) -> dict[str, tuple[int, ...]]:
        """The trainable values' names and shapes (to check a saved adapter against a model)."""
        return {name: value.shape for name, value in self.plan(base, seed=0).initial_values().items()}

    def kept_for_backward(self, shapes: Mapping[str, tuple[int, ...]],
                          linear: Mapping[str, tuple[int, int]]) -> tuple[set[str], float]:
        """What the backward keeps for this method's trainable values (named in `shapes`) beyond the base's,
        for the memory estimate: the linear layers whose input it reads, and extra values per token summed
        over the blocks. By default: the input of every linear layer whose own weight trains."""
        return {name.rpartition(".")[0] for name in shapes if name.endswith(".weight")
                and name.rpartition(".")[0] in linear}, 0.0

    @property
    def virtual_tokens(self) -> int:
        """Positions the method puts before the text (prompt and prefix methods); they count against
        the model's context."""
        return 0

    def prompt_problem(self, prompt_tokens: int) -> str | None:
        """Why an example whose prompt has this many tokens cannot be trained or scored with this
        method (a clause), or None (LoReFT needs its positions to exist)."""
        return None

    def saved_method(self) -> "Method":
        """The method whose trainable values an adapter file holds: the method itself, or (when
        training reparameterises them, as P-tuning's prompt encoder does) the method that holds
        their result. Evaluation, prediction and loading use it."""
        return self

    def frozen_values(self, spec) -> dict[str, np.ndarray]:
        """Frozen tensors an adapter of this method carries beside its trained values, drawn from the
        method's own keys (shared random projections): written with the adapter, and a saved one must
        equal them."""
        return {}

    def saved_values(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The trained values as `saved_method()` holds them (numpy; computed once, at saving)."""
        return dict(state)

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Float32 base weights with the trained values folded in (NF4 layers dequantized)."""
        raise TwintuneError(f"method {self.name} cannot be merged into the base model.")

    def adapter_config(self, base_model_name: str) -> dict:
        """What adapter_config.json says about this method (PEFT's keys where PEFT has the method)."""
        return {"twintune_method": self.name, **self.to_dict(), "base_model_name_or_path": base_model_name}

    def to_dict(self) -> dict:
        """The recipe keys and values, `name` first (lists, not tuples: as JSON reads them back)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    @classmethod
    def reads_adapter_config(cls, config: dict) -> bool:
        """Whether a PEFT adapter_config.json describes this method (by default: its peft_type)."""
        return cls.peft_type is not None and config.get("peft_type") == cls.peft_type

    @classmethod
    def from_adapter_config(cls, config: dict, where) -> "Method":
        """The method a PEFT adapter_config.json of this method's peft_type describes."""
        raise NotImplementedError

    # --- what a saved adapter's tensors must be, and the sentences when they are not ---

    @property
    def weight_kinds(self) -> str:
        return f"{self.title} {'/'.join(p.split('.')[0] for p in self.parts)}" if self.parts else f"{self.title} base-parameter"

    @property
    def selection(self) -> str:
        """What chose the adapted layers, for a sentence."""
        targets = getattr(self, "target_modules", None)
        if targets is None:
            return f"settings (method {self.name})"
        return f"target_modules {targets if isinstance(targets, str) else list(targets)!r}"

    def split_name(self, name: str) -> tuple[str | None, str | None]:
        """(layer, part) of a trainable value's name; part is None when it is no tensor of this method."""
        if self.parts is None:
            layer, _, part = name.rpartition(".")
            return layer, part
        for part in self.parts:
            if name.endswith("." + part):
                return name[: -len(part) - 1], part
        return None, None

    def layer_detail(self, layer: str) -> str:
        """A few words on what sets a layer's shapes (LoRA: its rank)."""
        return ""

    def missing_message(self, missing: list[str], state: Mapping[str, np.ndarray]) -> str:
        if self.parts is None:
            return f"adapter has no {missing[0]!r}, which method {self.name} trains ({len(missing)} such tensors missing)."
        layer, part = self.split_name(missing[0])
        if any(self.split_name(name)[0] == layer for name in state):
            return (f"adapter has no {part.split('.')[0]} weight for layer {layer!r}; every adapted layer needs "
                    f"{' and '.join(p.split('.')[0] for p in self.parts)}.")
        layers = {self.split_name(name)[0] for name in missing}
        return (f"adapter has no {'/'.join(p.split('.')[0] for p in self.parts)} weights for layer {layer!r}, which "
                f"its target_modules select ({len(layers)} such layers).")


def dense_weights(base: BaseModel) -> dict[str, np.ndarray]:
    """Every base weight as float32, NF4 layers dequantized: the start of a merge."""
    merged = {name: np.asarray(value, np.float32) for name, value in base.weights.items()}
    for layer in base.quantized:
        merged[f"{layer}.weight"] = base.linear_weight(layer)
    return merged


def refuse_low_precision(method: str, dtype: str) -> None:
    """Unfrozen base parameters train in the model's dtype: float32, float64, or bfloat16 with a
    compensation (optimizers.compensated_update); float16's range needs loss scaling, which its
    values' own updates would not survive."""
    if dtype == "float16":
        raise TwintuneError(f"method {method} trains the base model's own parameters, which cannot train in float16 "
                            "(its range needs loss scaling and its 10-bit values lose small updates): use dtype "
                            "bfloat16 (or float32).")


def refuse_quantized(method: str, base: BaseModel, names: list[str]) -> None:
    """A method that trains a linear layer's own weight cannot train it quantized."""
    quantized = sorted({n.rsplit(".", 1)[0] for n in names} & set(base.quantized))
    if quantized or (base.quantization and base.quantization.type == "affine" and
                     any(n.endswith(".weight") and n.rsplit(".", 1)[0] in base.spec.linear_layers() for n in names)):
        raise TwintuneError(f"method {method} trains linear weights that this recipe quantizes "
                            f"({(quantized or ['affine layers'])[0]}...): quantized weights cannot be trained; "
                            "set quantize.type to none.")


def unfreeze_plan(method: str, base: BaseModel, names: list[str]) -> Plan:
    """A plan that trains these base parameters as they are (their own values are the start)."""
    refuse_low_precision(method, base.dtype)
    refuse_quantized(method, base, names)
    surgeries = tuple(Surgery(UNFREEZE, name, {name: np.asarray(base.weights[name], np.float32)}) for name in names)
    return Plan(method, surgeries)



class Unfreezing(Method):
    """A method that trains some of the base's own parameters: its plan unfreezes them, its
    merge puts the trained values in place."""

    def parameters(self, base: BaseModel) -> list[str]:
        raise NotImplementedError

    def plan(self, base: BaseModel, seed: int) -> Plan:
        return unfreeze_plan(self.name, base, self.parameters(base))

    def shapes(self, base: BaseModel) -> dict[str, tuple[int, ...]]:
        shapes = base.spec.weight_shapes()
        return {name: shapes[name] for name in self.parameters(base)}

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        merged = dense_weights(base)
        merged.update({name: np.asarray(value, np.float32) for name, value in state.items()})
        return merged
