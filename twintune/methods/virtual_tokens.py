"""What the methods with virtual tokens share (PEFT's "prompt learning": prompt tuning, P-tuning,
prefix tuning): `n` positions before the text, filled through one of GPT-Neo's slots, and in PEFT's
layout one `prompt_embeddings` tensor with a config of common keys."""

from __future__ import annotations

from typing import ClassVar

from twintune.errors import TwintuneError
from twintune.methods.base import BaseModel, Method, gpt_neo_slots
from twintune.models import GPTNeoSpec


class VirtualTokens(Method):
    """A method with `n` virtual tokens (a dataclass field of the subclass) in the model slot `slot`."""

    slot: ClassVar[str]
    layout: ClassVar[str] = "peft"

    @property
    def virtual_tokens(self) -> int:
        return self.n

    def gpt_neo(self, base: BaseModel) -> GPTNeoSpec:
        """The base's GPT-Neo spec, refusing other models (only twintune's GPT-Neo has the slot) and
        an `n` that leaves no position for text."""
        gpt_neo_slots(self.name, base.spec, self.slot)
        if self.n >= base.spec.max_positions:
            raise TwintuneError(f"method {self.name}'s n={self.n} virtual tokens leave no room for text in the "
                                f"model's {base.spec.max_positions} positions.")
        return base.spec

    def peft_config(self, base_model_name: str) -> dict:
        """The keys every PEFT prompt-learning config has. token_dim, num_attention_heads and num_layers
        stay null: PEFT fills them from the base model's config when it loads the adapter (as it does
        for a new one)."""
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
                "num_virtual_tokens": self.n, "token_dim": None, "num_transformer_submodules": 1,
                "num_attention_heads": None, "num_layers": None, "modules_to_save": None, "inference_mode": True}

    @classmethod
    def virtual_tokens_in(cls, config: dict, where) -> int:
        """The number of virtual tokens of a PEFT prompt-learning config, refusing what twintune cannot express."""
        task = config.get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise TwintuneError(f"adapter {where} is a PEFT {config.get('peft_type')} adapter for task_type {task!r}; "
                                f"twintune's {cls.title} is for causal language models (CAUSAL_LM).")
        submodules = config.get("num_transformer_submodules")
        if submodules not in (None, 1):
            raise TwintuneError(f"adapter {where} sets num_transformer_submodules={submodules!r} (for an "
                                "encoder-decoder model), but twintune's GPT-Neo is decoder-only (1).")
        if config.get("modules_to_save") not in (None, [], {}):
            raise TwintuneError(f"adapter {where} sets modules_to_save={config['modules_to_save']!r} (fully trained "
                                f"extra modules), which twintune's {cls.title} does not support.")
        n = config.get("num_virtual_tokens")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise TwintuneError(f"adapter {where} has num_virtual_tokens={n!r}; it must be a positive integer.")
        return n
