"""What every task shares: its recipe keys as a dataclass, checked by name and value (tasks/__init__.py)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


class Task:
    """A recipe's `task:` section: a dataclass whose fields are its keys (with defaults)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def validate(self) -> None:
        """Range checks on the keys (types are checked when the recipe is read)."""

    @property
    def linear_head(self) -> bool:
        return False

    @property
    def generative(self) -> bool:
        """Trained on next tokens (causal LM, instruction) and scored by loss and perplexity; such a task
        makes its own splits (`splits`)."""
        return False

    def splits(self, data, seed: int, tokenizer, length: int) -> dict:
        """A generative task's train, validation and test rows (lists of data.batching.Encoded) from the
        recipe's `data` section, at most `length` tokens each."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


