"""Instruction tuning: (prompt, completion) pairs from JSONL (data/instructions.py), each example the
prompt, the completion and the end-of-text token; the loss on the completion and end-of-text only
(`mask_prompt`, the default) or on every token after the first. Scored, like the causal LM, by the
validation loss and perplexity of what it is trained on.

With `packing`, each split's examples, in their seeded order, fill rows of up to `data.max_length`
tokens whole (an example is never cut): fewer, fuller rows, the loss still on each example's
completion and end-of-text only. An example then attends to the ones before it in its row (the
model has no per-example attention mask), as with TRL's `packing=True`.

`source: synthetic` gives an offline set: the synthetic sentences with the instruction to name
their sentiment (or in `template` as its field `{text}`), the label word as the completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from twintune.data.batching import Encoded
from twintune.data.chat import chat_example
from twintune.data.documents import eos_id, random_splits
from twintune.data.instructions import load_pairs, synthetic_instructions, template_fields
from twintune.errors import TwintuneError
from twintune.tasks.task import Generative


@dataclass(frozen=True)
class Instruction(Generative):
    """Supervised fine-tuning on prompt/completion pairs."""

    template: str = "{prompt}"
    completion: str = "completion"
    mask_prompt: bool = True
    packing: bool = False

    name: ClassVar[str] = "instruction"
    description: ClassVar[str] = "prompt/completion or chat JSONL, loss on the completion (mask_prompt)"

    def validate(self) -> None:
        template_fields(self.template)

    def check_recipe(self, recipe) -> None:
        if self.packing and recipe.method.name == "loreft":
            raise TwintuneError("method loreft edits each row's first and last prompt positions, which a packed row "
                                "of several instruction examples does not have; set task.packing to false.")

    def splits(self, data, seed: int, tokenizer, length: int, chat: dict | None = None) -> dict[str, list[Encoded]]:
        """Prompt + completion + end-of-text per example, the targets the completion and end-of-text
        (`mask_prompt`) or every token after the first; a conversation rendered with `chat` (the
        tokenizer's chat template or data.chat_template), the targets its assistant turns with their
        end-of-sequence token (data/chat.py chat_example); split by the seed."""
        if data.source == "synthetic":
            pairs = synthetic_instructions(data.synthetic_size, seed, self.template)
        elif data.source.endswith(".jsonl"):
            pairs = load_pairs(data.source, self.template, self.completion)
        else:
            raise TwintuneError(f"task instruction reads JSONL rows (prompt/completion, fields of task.template, or "
                                f"chat messages) or source synthetic; data.source {data.source!r} is neither.")
        eos = eos_id(tokenizer)
        encoded = []
        for i, (prompt, completion) in enumerate(pairs):
            if isinstance(prompt, list):  # a conversation: (messages, where)
                ids, mask = chat_example(prompt, chat, tokenizer, eos, completion)
                targets = np.array(mask) if self.mask_prompt else None
            else:
                prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
                ids = prompt_ids + tokenizer.encode(completion, add_special_tokens=False).ids + [eos]
                targets = np.arange(len(ids)) >= (max(len(prompt_ids), 1) if self.mask_prompt else 1)
            if len(ids) > length:
                raise TwintuneError(f"example #{i + 1} of {data.source} is {len(ids)} tokens with its prompt and "
                                    f"completion, longer than data.max_length={length}; raise it (up to the model's "
                                    "context) or shorten it.")
            encoded.append(_example(ids, targets))
        parts = random_splits(len(encoded), data.validation_fraction, data.test_fraction, seed, data.source, "examples")
        splits = {split: [encoded[i] for i in idx] for split, idx in parts.items()}
        return {split: pack_examples(part, length) for split, part in splits.items()} if self.packing else splits


def _example(ids: list[int], targets: np.ndarray | None) -> Encoded:
    """An example whose targets are `targets` (None: every token after the first); where they are
    all the tokens after a prompt, as a prompt length (the common layout), else as a mask."""
    if targets is None:
        return Encoded(np.array(ids, np.int32), 1, 0)
    targets = targets.copy()
    targets[0] = False  # nothing predicts a row's first token
    first = int(targets.argmax()) if targets.any() else len(ids)
    if targets[first:].all():
        return Encoded(np.array(ids, np.int32), max(first, 1), 0)
    return Encoded(np.array(ids, np.int32), 1, 0, target_mask=targets)


def pack_examples(examples: list[Encoded], length: int) -> list[Encoded]:
    """Examples, in order, into rows of at most `length` tokens, each example whole; a row's targets
    are its examples' own (after each prompt), never a row's first token.

    Example:
        >>> rows = pack_examples([Encoded(np.array([1, 2, 3], np.int32), 2, 0),
        ...                       Encoded(np.array([4, 5], np.int32), 1, 0)], length=5)
        >>> rows[0].ids.tolist(), rows[0].target_mask.tolist()
        ([1, 2, 3, 4, 5], [False, False, True, False, True])
    """
    rows, ids, mask = [], [], []
    for example in examples:
        if ids and len(ids) + len(example.ids) > length:
            rows.append(_packed_row(ids, mask))
            ids, mask = [], []
        ids += example.ids.tolist()
        mask += (example.target_mask.tolist() if example.target_mask is not None else
                 [False] * example.prompt_len + [True] * (len(example.ids) - example.prompt_len))
    if ids:
        rows.append(_packed_row(ids, mask))
    return rows


def _packed_row(ids: list[int], mask: list[bool]) -> Encoded:
    mask[0] = False  # nothing predicts a row's first token
    return Encoded(np.array(ids, np.int32), 1, 0, target_mask=np.array(mask))
