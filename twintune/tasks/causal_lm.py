"""Causal LM: continued next-token training on unlabelled text (domain-adaptive pre-training).

Documents (data/documents.py) are packed into rows of `data.max_length` tokens with the
end-of-text token between them (`packing: false`: one document per row, padded); the loss is on
every real token after a row's first, and a run is scored by its validation loss per token and
perplexity. The prompt's template and labels play no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.tasks.task import Task


@dataclass(frozen=True)
class CausalLM(Task):
    """Next-token prediction on every token of packed (or padded) documents."""

    packing: bool = True

    name: ClassVar[str] = "causal_lm"
    description: ClassVar[str] = "next-token training on unlabelled text, packed; scored by perplexity"

    @property
    def generative(self) -> bool:
        return True
