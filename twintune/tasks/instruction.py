"""Instruction tuning: (prompt, completion) pairs from JSONL (data/instructions.py), each example the
prompt, the completion and the end-of-text token; the loss on the completion and end-of-text only
(`mask_prompt`, the default) or on every token after the first. Scored, like the causal LM, by the
validation loss and perplexity of what it is trained on.

`source: synthetic` gives an offline set: the synthetic sentences with the instruction to name
their sentiment, the label word as the completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.data.instructions import template_fields
from twintune.tasks.task import Task


@dataclass(frozen=True)
class Instruction(Task):
    """Supervised fine-tuning on prompt/completion pairs."""

    template: str = "{prompt}"
    completion: str = "completion"
    mask_prompt: bool = True

    name: ClassVar[str] = "instruction"
    description: ClassVar[str] = "prompt/completion or chat JSONL, loss on the completion (mask_prompt)"

    def validate(self) -> None:
        template_fields(self.template)

    @property
    def generative(self) -> bool:
        return True
