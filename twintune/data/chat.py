"""Chat templates: a tokenizer's own Jinja template (tokenizer_config.json's `chat_template`, as
transformers reads it) rendering lists of `{role, content}` messages to text, with transformers'
settings (a sandboxed environment, trim_blocks, lstrip_blocks, `raise_exception`, `tojson`), so the
text and its token ids are what `tokenizer.apply_chat_template` gives.

Conversational preference rows (TRL's format: `prompt` a list of messages, `chosen`/`rejected`/
`completion` lists of the assistant's) become text as TRL's `maybe_apply_chat_template` makes it:
the prompt rendered with the generation prompt, an answer the rendering of prompt + answer less
the prompt's text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from itertools import takewhile
from pathlib import Path

from twintune.errors import TwintuneError


def read_chat_template(model_dir: str | Path, template: str = "") -> dict | None:
    """A model directory's chat template and the special tokens it may name ({"template", "bos_token",
    "eos_token"}), or None where tokenizer_config.json has none (a named list: its "default").
    `template` (the recipe's data.chat_template) is used instead of the directory's own, with its
    special tokens.

    Example:
        >>> from twintune.formats.checkpoint import resolve_model_dir
        >>> read_chat_template(resolve_model_dir("builtin:tiny-gpt-neo")) is None   # GPT-Neo's tokenizer has none
        True
        >>> read_chat_template(resolve_model_dir("builtin:tiny-gpt-neo"), "{{ messages }}")["eos_token"]
        '<|endoftext|>'
    """
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    template = template or config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return None
    return {"template": template, **{k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}}


def _token_text(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def render(messages: list[dict], chat: dict, add_generation_prompt: bool = False) -> str:
    """The messages as the template writes them.

    Example:
        >>> chat = {"template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        ...         "{% if add_generation_prompt %}<assistant>{% endif %}", "bos_token": "", "eos_token": ""}
        >>> render([{"role": "user", "content": "Hi"}], chat, add_generation_prompt=True)
        '<user>Hi<assistant>'
    """
    try:
        return _compiled(chat["template"]).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  bos_token=chat["bos_token"], eos_token=chat["eos_token"])
    except TwintuneError:
        raise
    except Exception as error:  # noqa: BLE001 - the template's own complaint, as one sentence
        raise TwintuneError(f"the chat template (data.chat_template, or the tokenizer's) cannot render these messages "
                            f"({error}).") from None


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TwintuneError(f"the chat template (data.chat_template, or the tokenizer's) refuses these messages: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)


def messages_of(value, column: str, where: str) -> list[dict]:
    """A column's list of {role, content} messages, checked."""
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in value):
        raise TwintuneError(f"{where}: column '{column}' must be a list of {{role, content}} messages.")
    return value


def render_row(row: dict, chat: dict | None, texts: tuple[str, ...], where: str) -> dict:
    """A row whose text columns are lists of messages, as text, as TRL's apply_chat_template makes it:
    the prompt rendered with the generation prompt (unless its last message is the assistant's), each
    answer column the rendering of prompt + answer after the longest start they all share with the
    prompt's; `conversational` marks the row (its answers follow their prompt exactly: no space is put
    between them)."""
    if chat is None:
        column = next(c for c in texts if isinstance(row.get(c), list))
        raise TwintuneError(f"{where}: column '{column}' holds chat messages, and this model's tokenizer has no chat "
                            "template to render them with: set data.chat_template to one (a Jinja template, as "
                            "tokenizer_config.json's chat_template), or give the texts as plain strings.")
    if not isinstance(row["prompt"], list):
        raise TwintuneError(f"{where}: the answers are chat messages but 'prompt' is plain text; give the prompt as "
                            "messages too (TRL's conversational format).")
    prompt = messages_of(row["prompt"], "prompt", where)
    text = render(prompt, chat, add_generation_prompt=prompt[-1]["role"] != "assistant")
    wholes = {column: render(prompt + messages_of(row[column], column, where), chat)
              for column in texts if column != "prompt" and column in row}
    for whole in wholes.values():  # DeepSeek-R1's generation prompt differs from its rendered turn: TRL's rule
        text = "".join(a for a, _ in takewhile(lambda pair: pair[0] == pair[1], zip(text, whole)))
    return {**row, "prompt": text, **{column: whole[len(text):] for column, whole in wholes.items()},
            "conversational": True}


def chat_example(messages, chat: dict | None, tokenizer, eos: int, where: str) -> tuple[list[int], list[bool]]:
    """A conversation's token ids and which of them the loss is on.

    The ids are the whole conversation as the template renders it, tokenized at once: what
    transformers' `apply_chat_template(messages, tokenize=True)` gives. The loss is on each
    assistant turn: the text that rendering it adds after the conversation before it with the
    generation prompt, up to and with its end-of-sequence token where the template writes one (not
    the separators after it). Where the last turn has no end-of-sequence token, one is added after
    it, so the model learns to stop.

    Example:
        >>> from twintune.formats.checkpoint import load_tokenizer, resolve_model_dir
        >>> tokenizer = load_tokenizer(resolve_model_dir("builtin:tiny-gpt-neo"))
        >>> chat = read_chat_template(resolve_model_dir("builtin:tiny-gpt-neo"), "{% for m in messages %}{{ m.role }}: "
        ...                           "{{ m.content }}"
        ...                           "{{ eos_token if m.role == 'assistant' }}\\n{% endfor %}"
        ...                           "{% if add_generation_prompt %}assistant:{% endif %}")
        >>> ids, mask = chat_example([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello"}],
        ...                          chat, tokenizer, eos=0, where="row 1")
        >>> tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        ' Hello<|endoftext|>'
    """
    if chat is None:
        raise TwintuneError(f"{where} holds chat messages, and this model's tokenizer has no chat template (GPT-Neo's "
                            "has none): set data.chat_template to one (a Jinja template, as tokenizer_config.json's "
                            "chat_template), or give prompt/completion rows.")
    messages = messages_of(messages, "messages", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise TwintuneError(f"{where}: the conversation has no assistant message, so nothing to learn from it.")
    text = render(messages, chat)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], chat, add_generation_prompt=True), render(messages[: i + 1], chat)
        if not (through.startswith(before) and text.startswith(through)):
            raise TwintuneError(f"{where}: the chat template does not write a conversation as the text of its turns "
                                "one after the other, so the assistant's turns cannot be found in it.")
        end = through.rfind(chat["eos_token"], len(before)) if chat["eos_token"] else -1
        spans.append((len(before), end + len(chat["eos_token"]) if end >= 0 else len(through)))
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    mask = [any(start <= a < stop for start, stop in spans) for a, _ in encoding.offsets]
    if ids[-1] != eos and not (chat["eos_token"] and text.rstrip().endswith(chat["eos_token"])):
        ids, mask = ids + [eos], mask + [True]
    return ids, mask
