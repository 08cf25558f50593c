"""Instruction data for the instruction task: JSONL rows in, (prompt, completion) pairs or
conversations out.

Three row shapes, the ones mlx-lm and TRL read:
- `{"prompt": ..., "completion": ...}`: the prompt through the task's template (default "{prompt}");
- any fields named by the template, e.g. Alpaca's `{"instruction", "input", "output"}` with
  template "Instruction: {instruction}\nInput: {input}\nOutput:" and `completion: output`;
- `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` (TRL's
  conversational format): kept as the list of messages, rendered later with the tokenizer's chat
  template, or the recipe's data.chat_template (data/chat.py chat_example).

Example:
    >>> template_pair({"prompt": "Q: 2+2?", "completion": "4"}, "{prompt}", ["prompt"], "completion", "row 1")
    ('Q: 2+2?', ' 4')
"""

from __future__ import annotations

import string

from twintune.errors import TwintuneError

def load_pairs(path: str, template: str, completion: str) -> list[tuple[str, str] | tuple[list[dict], str]]:
    """(prompt, completion) pairs from a JSONL file, and (messages, where) for a conversation's row; a
    row missing a field is refused with its line."""
    from twintune.data.sources import json_lines, open_text

    fields = template_fields(template)
    pairs = []
    with open_text(path) as handle:
        for number, row in json_lines(handle, path):
            where = f"{path} line {number}"
            pairs.append((conversation(row["messages"], where), where) if "messages" in row else
                         template_pair(row, template, fields, completion, where))
    if not pairs:
        raise TwintuneError(f"{path} holds no rows.")
    return pairs


def template_fields(template: str) -> list[str]:
    """The fields a template names; anything but plain `{field}` placeholders is refused."""
    try:
        fields = [name for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise TwintuneError(f"task.template {template!r} is not a valid template ({error}).") from None
    if not fields:
        raise TwintuneError(f"task.template {template!r} names no field; write e.g. \"{{prompt}}\" or "
                            "\"Instruction: {instruction}\\nOutput:\".")
    if any(not name.isidentifier() for name in fields):
        raise TwintuneError(f"task.template {template!r} has a placeholder that is not a plain field name.")
    return fields


def template_pair(row: dict, template: str, fields: list[str], completion: str, where: str) -> tuple[str, str]:
    for field in fields:
        if field not in row:
            raise TwintuneError(f"{where} has no field '{field}', which task.template {template!r} needs.")
    if completion not in row:
        raise TwintuneError(f"{where} has no completion: no field '{completion}' (task.completion).")
    answer = row[completion]
    if not isinstance(answer, str) or not answer.strip():
        raise TwintuneError(f"{where} has an empty completion ('{completion}').")
    prompt = template.format(**{field: "" if row[field] is None else str(row[field]) for field in fields})
    return prompt, answer if answer[0].isspace() or prompt[-1:].isspace() else " " + answer


def conversation(messages, where: str) -> list[dict]:
    """A row's chat messages, checked: {role, content} objects, one of them at least the assistant's."""
    from twintune.data.chat import messages_of

    messages = messages_of(messages, "messages", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise TwintuneError(f"{where}: the conversation has no assistant message, so nothing to learn from it.")
    return messages


SYNTHETIC_INSTRUCTION = ("Instruction: Is the sentiment of this sentence negative, neutral or positive?\n"
                         "Input: {text}\nOutput:")


def synthetic_instructions(n: int, seed: int, template: str = "{prompt}") -> list[tuple[str, str]]:
    """The offline instruction set: each synthetic sentence with the instruction to name its sentiment
    (SYNTHETIC_INSTRUCTION), or in `template` as its field `text`; the completion the label word.

    Example:
        >>> prompt, completion = synthetic_instructions(1, seed=0, template="Q: {text} A:")[0]
        >>> prompt.startswith("Q: "), completion in (" negative", " neutral", " positive")
        (True, True)
    """
    from twintune.data.sources import load_examples

    if template == "{prompt}":  # the task's default template: the built-in instruction
        template = SYNTHETIC_INSTRUCTION
    elif template_fields(template) != ["text"]:
        raise TwintuneError(f"task.template {template!r} must name the one field source synthetic has, {{text}} (the "
                            "sentence), or be left out for the built-in instruction.")
    return [(template.format(text=e.text), " " + e.label)
            for e in load_examples("synthetic", synthetic_size=n, seed=seed)]
