"""Instruction data for the instruction task: JSONL rows in, (prompt, completion) pairs out.

Three row shapes, the ones mlx-lm and TRL read:
- `{"prompt": ..., "completion": ...}`: the prompt through the task's template (default "{prompt}");
- any fields named by the template, e.g. Alpaca's `{"instruction", "input", "output"}` with
  template "Instruction: {instruction}\\nInput: {input}\\nOutput:" and `completion: output`;
- `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`: GPT-Neo has no
  chat template, so each message is a line "Role: content"; the last message must be the
  assistant's and is the completion, everything before it (ending in "Assistant:") the prompt.

Example:
    >>> chat_pair([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "row 1")
    ('User: Hi\\nAssistant:', ' Hello.')
"""

from __future__ import annotations

import string

from twintune.errors import TwintuneError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def load_pairs(path: str, template: str, completion: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a JSONL file; a row missing a field is refused with its line."""
    from twintune.data.sources import json_lines, open_text

    fields = template_fields(template)
    pairs = []
    with open_text(path) as handle:
        for number, row in json_lines(handle, path):
            where = f"{path} line {number}"
            pairs.append(chat_pair(row["messages"], where) if "messages" in row else
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


def chat_pair(messages, where: str) -> tuple[str, str]:
    """The messages up to the last as the prompt ("Role: content" lines, then "Assistant:"), the
    last (the assistant's) as the completion."""
    if not isinstance(messages, list) or not messages:
        raise TwintuneError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    lines = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise TwintuneError(f"{where}: message {i} must be an object with a text 'content'.")
        role = message.get("role")
        if role not in ROLES:
            raise TwintuneError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}.")
        lines.append((role, message["content"]))
    if lines[-1][0] != "assistant" or not lines[-1][1].strip():
        raise TwintuneError(f"{where}: the last message must be the assistant's, with text: it is the completion.")
    prompt = "\n".join(f"{ROLES[role]}: {content}" for role, content in lines[:-1])
    return (prompt + "\n" if prompt else "") + "Assistant:", " " + lines[-1][1].lstrip()


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
