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

import numpy as np

from twintune.data.batching import Encoded
from twintune.data.documents import eos_id, random_splits
from twintune.data.instructions import load_pairs, synthetic_instructions, template_fields
from twintune.errors import TwintuneError
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

    def splits(self, data, seed: int, tokenizer, length: int) -> dict[str, list[Encoded]]:
        """Prompt + completion + end-of-text per example, the targets the completion and end-of-text
        (`mask_prompt`) or every token after the first; split by the seed."""
        if data.source == "synthetic":
            pairs = synthetic_instructions(data.synthetic_size, seed)
        elif data.source.endswith(".jsonl"):
            pairs = load_pairs(data.source, self.template, self.completion)
        else:
            raise TwintuneError(f"task instruction reads JSONL rows (prompt/completion, fields of task.template, or "
                                f"chat messages) or source synthetic; data.source {data.source!r} is neither.")
        eos = eos_id(tokenizer)
        encoded = []
        for i, (prompt, completion) in enumerate(pairs):
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
            ids = prompt_ids + tokenizer.encode(completion, add_special_tokens=False).ids + [eos]
            if len(ids) > length:
                raise TwintuneError(f"example #{i + 1} of {data.source} is {len(ids)} tokens with its prompt and "
                                    f"completion, longer than data.max_length={length}; raise it (up to the model's "
                                    "context) or shorten it.")
            encoded.append(Encoded(np.array(ids, np.int32), max(len(prompt_ids), 1) if self.mask_prompt else 1, 0))
        parts = random_splits(len(encoded), data.validation_fraction, data.test_fraction, seed, data.source, "examples")
        return {split: [encoded[i] for i in idx] for split, idx in parts.items()}
