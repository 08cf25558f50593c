"""Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021): n trainable virtual tokens
put before the text's token embeddings (GPT-Neo's `transformer.prompt` slot).

Prompt tuning trains the n embeddings themselves. Its start is PEFT's: `random` (N(0, 1), as
torch's nn.Embedding), `sample_vocab` (the token embeddings of n random vocabulary ids) or `text`
(the token embeddings of `init_text`, repeated or cut to n tokens).

P-tuning trains a prompt encoder whose output is the n embeddings, with PEFT's shapes: an input
embedding (n, d), then `mlp` (Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d)) or `lstm`
(a bidirectional LSTM of `encoder_num_layers` layers with `encoder_dropout` between them, then
Linear(2h, 2h), ReLU, Linear(2h, d)); h is `encoder_hidden_size`, the model's width by default
(0). Starts as torch's: embedding N(0, 1), linear layers and the LSTM uniform in ±1/sqrt(fan in)
and ±1/sqrt(h). The encoder only reparameterises training: as PEFT saves it, the adapter holds
its output, so a P-tuning adapter is a prompt-tuning adapter (`saved_method`) with those values.

PEFT layout: one tensor `prompt_embeddings` (n, d) and PEFT's PROMPT_TUNING / P_TUNING config.
Virtual tokens are extra positions, not weights: neither method merges.
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

SLOT = "transformer.prompt"
EMBEDDING = f"{SLOT}.embedding.weight"
INITS = ("random", "sample_vocab", "text")
ENCODERS = ("mlp", "lstm")


@dataclass(frozen=True, eq=False)
class PromptEmbeddingLayer(Layer):
    """Prompt tuning's virtual-token embeddings, trained as they are."""


@dataclass(frozen=True, eq=False)
class PromptEncoderLayer(Layer):
    """P-tuning's prompt encoder: an MLP, or a bidirectional LSTM then an MLP (`encoder`)."""

    encoder: str
    num_layers: int
    dropout: float


class PromptLearning(VirtualTokens):
    """What prompt tuning and P-tuning share: the slot, the saved tensor and its sentences."""

    slot: ClassVar[str] = SLOT
    file_names: ClassVar[Mapping[str, str]] = {EMBEDDING: "prompt_embeddings"}

    def check_base(self, base: BaseModel) -> int:
        """The model's width, refusing models without the prompt slot or too short for n virtual tokens."""
        return self.gpt_neo(base).hidden_size

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise TwintuneError(f"method {self.name} cannot be merged into the base model: its virtual tokens are extra "
                            "input positions, not changes to any weight.")

    def missing_message(self, missing: list[str], state: Mapping[str, np.ndarray]) -> str:
        return f"adapter has no 'prompt_embeddings' tensor, the virtual tokens a {self.title} adapter holds."


@dataclass(frozen=True)
class PromptTuning(PromptLearning):
    """n trainable virtual-token embeddings before the text.

    Example:
        >>> plan = PromptTuning(n=8, init="sample_vocab").plan(base, seed=0)   # the built-in tiny GPT-Neo
        >>> plan.initial_values()["transformer.prompt.embedding.weight"].shape
        (8, 64)
    """

    n: int = 20
    init: str = "random"
    init_text: str = ""

    name: ClassVar[str] = "prompt"
    listed: ClassVar[int] = 7  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "prompt tuning"
    description: ClassVar[str] = ("n trainable virtual tokens before the text; init random, sample_vocab or text "
                                  "(PEFT prompt tuning)")
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("prompt", "module methods", {"n": 20, "init": "sample_vocab"}, 0.3),
    )
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    parts: ClassVar[tuple[str, ...]] = ("embedding.weight",)

    def validate(self) -> None:
        check(self.n > 0, f"recipe key 'method.n' must be a positive number of virtual tokens, got {self.n}.")
        check(self.init in INITS, f"recipe key 'method.init' must be {', '.join(INITS[:-1])} or {INITS[-1]}, "
                                  f"got {self.init!r}.")
        check(self.init != "text" or bool(self.init_text.strip()),
              "method prompt with init: text needs init_text, the words whose token embeddings start the virtual tokens.")
        check(self.init == "text" or not self.init_text,
              f"recipe key 'method.init_text' is used only with init: text (init is {self.init}).")

    def shapes(self, base: BaseModel) -> dict[str, tuple[int, ...]]:
        return {EMBEDDING: (self.n, self.check_base(base))}

    def plan(self, base: BaseModel, seed: int) -> Plan:
        d = self.check_base(base)
        rng = np.random.default_rng(seed)
        if self.init == "random":
            start = rng.standard_normal((self.n, d))
        else:
            wte = np.asarray(base.weights["transformer.wte.weight"], np.float32)
            start = wte[self.start_ids(base, rng)]
        values = {EMBEDDING: np.asarray(start, np.float32)}
        return Plan(self.name, (Surgery(INSERT, SLOT, values, PromptEmbeddingLayer()),))

    def start_ids(self, base: BaseModel, rng: np.random.Generator) -> np.ndarray:
        """The token ids whose embeddings start the virtual tokens (PEFT's SAMPLE_VOCAB and TEXT)."""
        if self.init == "sample_vocab":
            return rng.integers(0, base.spec.vocab_size, self.n)
        if base.tokenizer is None:
            raise TwintuneError("method prompt with init: text needs the model's tokenizer to read init_text.")
        ids = base.tokenizer.encode(self.init_text).ids
        if not ids:
            raise TwintuneError(f"method.init_text {self.init_text!r} gives no tokens.")
        return np.array((ids * math.ceil(self.n / len(ids)))[: self.n])

    def saved_method(self) -> "PromptTuning":
        """The trained embeddings are the values; how they started no longer matters (and `text` would
        need the tokenizer), so the saved form plans from a random start."""
        return dataclasses.replace(self, init="random", init_text="")

    @classmethod
    def from_adapter_config(cls, config: dict, where) -> "PromptTuning":
        n = cls.virtual_tokens_in(config, where)
        init = str(config.get("prompt_tuning_init") or "RANDOM").upper()
        if init.lower() not in INITS:
            raise TwintuneError(f"adapter {where} sets prompt_tuning_init={init!r}, which twintune's prompt tuning "
                                "does not have (it has RANDOM, SAMPLE_VOCAB and TEXT).")
        text = (config.get("prompt_tuning_init_text") or "") if init == "TEXT" else ""
        method = cls(n=n, init=init.lower(), init_text=text)
        method.validate()
        return method

    def adapter_config(self, base_model_name: str) -> dict:
        text = self.init == "text"
        return {**self.peft_config(base_model_name), "prompt_tuning_init": self.init.upper(),
                "prompt_tuning_init_text": self.init_text if text else None,
                "tokenizer_name_or_path": base_model_name if text else None, "tokenizer_kwargs": None}


@dataclass(frozen=True)
class PTuning(PromptLearning):
    """n virtual tokens computed by a trained prompt encoder (an MLP or a bidirectional LSTM).

    Example:
        >>> plan = PTuning(n=8, encoder="lstm", encoder_hidden_size=16).plan(base, seed=0)
        >>> plan.initial_values()["transformer.prompt.lstm_head.weight_ih_l0_reverse"].shape
        (64, 64)
    """

    n: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int = 0  # 0: the model's width (PEFT's default)
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    name: ClassVar[str] = "ptuning"
    listed: ClassVar[int] = 8  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "P-tuning"
    description: ClassVar[str] = ("n virtual tokens made by a trained prompt encoder, encoder mlp or lstm "
                                  "(PEFT P-tuning; saved as the encoder's output)")
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("ptuning", "module methods", {"n": 20, "encoder": "mlp"}, 3e-3),
    )
    peft_type: ClassVar[str] = "P_TUNING"

    def validate(self) -> None:
        check(self.n > 0, f"recipe key 'method.n' must be a positive number of virtual tokens, got {self.n}.")
        check(self.encoder in ENCODERS, f"recipe key 'method.encoder' must be mlp or lstm, got {self.encoder!r}.")
        check(self.encoder_hidden_size >= 0, "recipe key 'method.encoder_hidden_size' must be positive (or 0 for the "
                                             f"model's width), got {self.encoder_hidden_size}.")
        check(self.encoder_num_layers > 0, "recipe key 'method.encoder_num_layers' must be a positive number of "
                                           f"layers, got {self.encoder_num_layers}.")
        check(0 <= self.encoder_dropout < 1,
              f"recipe key 'method.encoder_dropout' must be in [0, 1), got {self.encoder_dropout}.")
        if self.encoder == "mlp":
            check(self.encoder_num_layers == 2 and self.encoder_dropout == 0,
                  "recipe keys 'method.encoder_num_layers' and 'method.encoder_dropout' shape the lstm encoder only; "
                  "PEFT's mlp encoder always has three linear layers and no dropout.")

    def hidden_size(self, d: int) -> int:
        return self.encoder_hidden_size or d

    def shapes(self, base: BaseModel) -> dict[str, tuple[int, ...]]:
        d = self.check_base(base)
        return {name: shape for name, shape, _ in self.parameters(d)}

    def parameters(self, d: int) -> list[tuple[str, tuple[int, ...], float]]:
        """(name, shape, the bound of its uniform start; 0: N(0, 1)) of each value, as PEFT's encoder has them."""
        h = self.hidden_size(d)
        values = [(EMBEDDING, (self.n, d), 0.0)]
        if self.encoder == "lstm":
            bound = 1 / math.sqrt(h)
            for k in range(self.encoder_num_layers):
                for suffix in ("", "_reverse"):
                    values += [(f"{SLOT}.lstm_head.weight_ih_l{k}{suffix}", (4 * h, d if k == 0 else 2 * h), bound),
                               (f"{SLOT}.lstm_head.weight_hh_l{k}{suffix}", (4 * h, h), bound),
                               (f"{SLOT}.lstm_head.bias_ih_l{k}{suffix}", (4 * h,), bound),
                               (f"{SLOT}.lstm_head.bias_hh_l{k}{suffix}", (4 * h,), bound)]
            sizes = [2 * h, 2 * h, d]
        else:
            sizes = [d, h, h, d]
        for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
            values += [(f"{SLOT}.mlp_head.{2 * i}.weight", (fan_out, fan_in), 1 / math.sqrt(fan_in)),
                       (f"{SLOT}.mlp_head.{2 * i}.bias", (fan_out,), 1 / math.sqrt(fan_in))]
        return values

    def plan(self, base: BaseModel, seed: int) -> Plan:
        d = self.check_base(base)
        rng = np.random.default_rng(seed)
        values = {name: (rng.uniform(-bound, bound, shape) if bound else rng.standard_normal(shape)).astype(np.float32)
                  for name, shape, bound in self.parameters(d)}
        layer = PromptEncoderLayer(self.encoder, self.encoder_num_layers, self.encoder_dropout)
        return Plan(self.name, (Surgery(INSERT, SLOT, values, layer),))

    def saved_method(self) -> PromptTuning:
        """As PEFT saves P-tuning: the encoder's output, which prompt tuning with n virtual tokens holds directly."""
        return PromptTuning(n=self.n)

    def saved_values(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The encoder's output (n, d), in numpy with the backends' formulas (float64, then the values' dtype)."""
        dtype = state[EMBEDDING].dtype
        own = {name.removeprefix(SLOT + "."): np.asarray(value, np.float64) for name, value in state.items()}
        x = own["embedding.weight"]
        if self.encoder == "lstm":
            for k in range(self.encoder_num_layers):  # no dropout: saving is not training
                x = np.concatenate([lstm_direction(own, x, k, ""), lstm_direction(own, x, k, "_reverse")], axis=1)
        layers = 3 if self.encoder == "mlp" else 2
        for i in range(layers):
            x = x @ own[f"mlp_head.{2 * i}.weight"].T + own[f"mlp_head.{2 * i}.bias"]
            x = np.maximum(x, 0) if i < layers - 1 else x
        return {EMBEDDING: x.astype(dtype)}

    @classmethod
    def from_adapter_config(cls, config: dict, where) -> "PTuning":
        n = cls.virtual_tokens_in(config, where)
        encoder = str(config.get("encoder_reparameterization_type") or "MLP")
        if encoder.lower() not in ENCODERS:
            raise TwintuneError(f"adapter {where} sets encoder_reparameterization_type={encoder!r}, which twintune's "
                                "P-tuning does not have (it has MLP and LSTM).")
        hidden = config.get("encoder_hidden_size") or 0
        lstm = encoder == "LSTM"  # PEFT ignores the number of layers and the dropout of its MLP
        method = cls(n=n, encoder=encoder.lower(), encoder_hidden_size=hidden,
                     encoder_num_layers=config.get("encoder_num_layers", 2) if lstm else 2,
                     encoder_dropout=float(config.get("encoder_dropout") or 0.0) if lstm else 0.0)
        method.validate()
        return method

    def adapter_config(self, base_model_name: str) -> dict:
        return {**self.peft_config(base_model_name), "encoder_reparameterization_type": self.encoder.upper(),
                "encoder_hidden_size": self.encoder_hidden_size or None, "encoder_num_layers": self.encoder_num_layers,
                "encoder_dropout": self.encoder_dropout}


def sigmoid(x: np.ndarray) -> np.ndarray:
    # through tanh, as the backends compute it (MLX's float64 exp is float32-accurate; its tanh is exact)
    return 0.5 * (1 + np.tanh(0.5 * x))


def lstm_direction(own: Mapping[str, np.ndarray], x: np.ndarray, k: int, suffix: str) -> np.ndarray:
    """One direction of LSTM layer k over the rows of x (torch's equations and gate order i, f, g, o)."""
    w_ih, w_hh = own[f"lstm_head.weight_ih_l{k}{suffix}"], own[f"lstm_head.weight_hh_l{k}{suffix}"]
    inputs = x @ w_ih.T + own[f"lstm_head.bias_ih_l{k}{suffix}"] + own[f"lstm_head.bias_hh_l{k}{suffix}"]
    h = c = np.zeros(w_hh.shape[1])
    out = np.zeros((len(x), w_hh.shape[1]))
    for t in (range(len(x)) if suffix == "" else reversed(range(len(x)))):
        i, f, g, o = np.split(inputs[t] + h @ w_hh.T, 4)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out[t] = h
    return out
