"""Prefix tuning (Li & Liang, 2021): every attention layer attends to n trained key/value pairs
before the text's, as PEFT's PREFIX_TUNING does.

The prefixes are one (n, blocks * 2 * hidden) table: row i holds virtual token i's keys and values
for every block, block l's keys at slot 2l and values at slot 2l + 1, each split into heads (PEFT's
`view(n, blocks * 2, heads, head_dim)`). With `projection` they are computed, while training,
by PEFT's reparameterisation: an (n, hidden) embedding through Linear(hidden, encoder_hidden_size),
tanh, Linear(encoder_hidden_size, blocks * 2 * hidden). The prefixes take positions 0..n-1: the
text starts at position n and local layers' windows count them as earlier positions (gpt_neo.py).

PEFT layout: adapter_model.safetensors holds `prompt_embeddings`, the final (n, blocks * 2 *
hidden) table; the projection MLP is not saved. So the adapter is always read back as the method
without projection (`saved_method`), whose one trainable value is that table, as PEFT itself uses
the saved table directly in inference mode. A run's training checkpoints keep the MLP for resuming.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.methods.base import INSERT, BaseModel, Comparison, Layer, Plan, Surgery
from twintune.methods.virtual_tokens import VirtualTokens

SLOT = "transformer.prefix"
TABLE = f"{SLOT}.embedding.weight"  # the prefixes themselves, or (with projection) the MLP's input embeddings
_INITS = ("random", "zero")


@dataclass(frozen=True, eq=False)
class PrefixLayer(Layer):
    """Keys and values of the virtual tokens for every attention layer (`projection`: made by an MLP
    from trained embeddings while training)."""

    num_layers: int
    num_heads: int
    projection: bool


@dataclass(frozen=True)
class Prefix(VirtualTokens):
    """Trained key/value prefixes of `n` virtual tokens in every attention layer.

    `encoder_hidden_size` 0 means the model's hidden size (PEFT's default); it matters only with
    `projection`. `init: zero` is PEFT's `init_weights="zero"` (the table, or the MLP's last layer,
    starts at zero).

    Example:
        >>> plan = Prefix(n=10).plan(base, seed=0)   # base: the built-in tiny GPT-Neo (4 blocks of width 64)
        >>> plan.initial_values()["transformer.prefix.embedding.weight"].shape
        (10, 512)
    """

    n: int = 20
    projection: bool = False
    encoder_hidden_size: int = 0
    init: str = "random"

    name: ClassVar[str] = "prefix"
    listed: ClassVar[int] = 9  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "prefix tuning"
    description: ClassVar[str] = ("trained keys and values of n virtual tokens in every attention layer, optionally "
                                  "through an MLP while training (PEFT prefix tuning)")
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("prefix", "module methods", {"n": 10, "projection": True}, 3e-3),
    )
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    slot: ClassVar[str] = SLOT
    file_names: ClassVar[Mapping[str, str]] = {TABLE: "prompt_embeddings"}

    def validate(self) -> None:
        check(self.n > 0, f"recipe key 'method.n' must be a positive number of virtual tokens, got {self.n}.")
        check(self.encoder_hidden_size >= 0, "recipe key 'method.encoder_hidden_size' must be positive (or 0: the "
                                             f"model's hidden size), got {self.encoder_hidden_size}.")
        check(self.init in _INITS, f"recipe key 'method.init' must be {' or '.join(_INITS)}, got {self.init!r}.")

    def plan(self, base: BaseModel, seed: int) -> Plan:
        """Initial values drawn once from the seed as PEFT draws them in kind: embeddings N(0, 1), the
        MLP's layers torch's default (uniform within 1/sqrt(fan_in), weights and biases)."""
        spec = self.gpt_neo(base)
        width = spec.num_layers * 2 * spec.hidden_size
        rng = np.random.default_rng(seed)
        zero = self.init == "zero"
        if not self.projection:
            table = np.zeros((self.n, width)) if zero else rng.standard_normal((self.n, width))
            values = {TABLE: table}
        else:
            hidden = self.encoder_hidden_size or spec.hidden_size

            def uniform(fan_in: int, shape) -> np.ndarray:  # torch's default for a Linear's weight and bias
                bound = 1.0 / math.sqrt(fan_in)
                return rng.uniform(-bound, bound, shape)

            values = {TABLE: rng.standard_normal((self.n, spec.hidden_size)),
                      f"{SLOT}.transform.0.weight": uniform(spec.hidden_size, (hidden, spec.hidden_size)),
                      f"{SLOT}.transform.0.bias": uniform(spec.hidden_size, (hidden,)),
                      f"{SLOT}.transform.2.weight": uniform(hidden, (width, hidden)),
                      f"{SLOT}.transform.2.bias": uniform(hidden, (width,))}
            if zero:  # PEFT's init_weights="zero": the last layer starts at zero, and so do the prefixes
                for name in (f"{SLOT}.transform.2.weight", f"{SLOT}.transform.2.bias"):
                    values[name] = np.zeros_like(values[name])
        values = {name: value.astype(np.float32) for name, value in values.items()}
        layer = PrefixLayer(spec.num_layers, spec.num_heads, self.projection)
        return Plan(self.name, (Surgery(INSERT, SLOT, values, layer),))

    def saved_method(self) -> "Prefix":
        """The adapter holds the final prefixes: the method without projection, whose one value they are."""
        return dataclasses.replace(self, projection=False)

    def saved_values(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The final prefixes, (n, blocks * 2 * hidden), in the state's dtype (the MLP computed in float64)."""
        if not self.projection:
            return dict(state)
        embedding, w0, b0, w2, b2 = (np.asarray(state[f"{SLOT}.{name}"], np.float64) for name in (
            "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"))
        table = np.tanh(embedding @ w0.T + b0) @ w2.T + b2
        return {TABLE: table.astype(state[TABLE].dtype)}

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise TwintuneError(f"method {self.name} cannot be merged into the base model: its prefixes are extra keys "
                            "and values that every attention layer attends to, which no weight of the model can hold.")

    # --- the adapter file ---

    @property
    def weight_kinds(self) -> str:
        return "prefix tuning prompt_embeddings"

    def split_name(self, name: str) -> tuple[str | None, str | None]:
        if name.startswith(SLOT + "."):
            return SLOT, name[len(SLOT) + 1:]
        return None, None

    def layer_detail(self, layer: str) -> str:
        return f" with n={self.n} virtual tokens (n by blocks x 2 x hidden size)"

    def missing_message(self, missing: list[str], state: Mapping[str, np.ndarray]) -> str:
        return f"adapter has no prompt_embeddings tensor, the prefixes a {self.title} adapter holds."

    def adapter_config(self, base_model_name: str) -> dict:
        """PEFT's PREFIX_TUNING config."""
        return {**self.peft_config(base_model_name), "encoder_hidden_size": self.encoder_hidden_size or None,
                "prefix_projection": self.projection, "init_weights": "zero" if self.init == "zero" else None}

    @classmethod
    def from_adapter_config(cls, config: dict, where) -> "Prefix":
        """Prefix tuning from a PEFT adapter_config.json, refusing what twintune cannot express."""
        n = cls.virtual_tokens_in(config, where)
        hidden = config.get("encoder_hidden_size")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
            raise TwintuneError(f"adapter {where} has encoder_hidden_size={hidden!r}; it must be a positive integer.")
        projection = config.get("prefix_projection", False)
        if not isinstance(projection, bool):
            raise TwintuneError(f"adapter {where} has prefix_projection={projection!r}; it must be true or false.")
        init = config.get("init_weights")
        if init not in (None, "zero"):
            raise TwintuneError(f"adapter {where} has init_weights={init!r}; PEFT's choices are null and \"zero\".")
        return cls(n=n, projection=projection, encoder_hidden_size=hidden or 0, init="zero" if init else "random")
