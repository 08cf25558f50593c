"""Causal LM: continued next-token training on unlabelled text (domain-adaptive pre-training).

Documents (data/documents.py) are packed into rows of `data.max_length` tokens with the
end-of-text token between them (`packing: false`: one document per row, padded); the loss is on
every real token after a row's first, and a run is scored by its validation loss per token and
perplexity. The prompt's template and labels play no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.data.batching import Encoded
from twintune.data.documents import eos_id, lm_rows, load_documents, one_per_row, pack, random_splits
from twintune.tasks.task import Generative


@dataclass(frozen=True)
class CausalLM(Generative):
    """Next-token prediction on every token of packed (or padded) documents."""

    packing: bool = True

    name: ClassVar[str] = "causal_lm"
    description: ClassVar[str] = "next-token training on unlabelled text, packed; scored by perplexity"

    def splits(self, data, seed: int, tokenizer, length: int, chat: dict | None = None) -> dict[str, list[Encoded]]:
        """Documents shuffled by the seed into train, validation and test, each split tokenized and
        packed (or one per row)."""
        documents = load_documents(data.source, text_column=data.text_column, synthetic_size=data.synthetic_size,
                                   seed=seed, split=data.split, config=data.config)
        parts = random_splits(len(documents), data.validation_fraction, data.test_fraction, seed, data.source,
                              "documents")
        rows = pack if self.packing else one_per_row
        return {split: lm_rows(rows([tokenizer.encode(documents[i], add_special_tokens=False).ids for i in idx],
                                    length, eos_id(tokenizer))) for split, idx in parts.items()}
