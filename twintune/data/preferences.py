"""Preference data: which of two answers people prefer, with TRL's column names.

- pairs (`reward`, `preference`): `prompt`, `chosen`, `rejected`;
- unpaired (`kto`): `prompt`, `completion`, `label` (true: a desirable completion);
- prompts (`grpo`): `prompt`, its other columns kept for the reward function.

Rows come from JSONL and CSV files, and through `datasets` from .parquet, .json and `hf:ORG/NAME`.
A column of chat messages (a list of `{role, content}`) is refused by name: GPT-Neo's tokenizer has
no chat template to render it with. `source: synthetic` is an offline set made from the synthetic
financial sentences: the prompt asks for a sentence's sentiment, the chosen answer names the
right one, the rejected answer a wrong one.

Example:
    >>> synthetic_pairs(2, seed=0)[0]
    {'prompt': 'Sentence: ... .\\nSentiment:', 'chosen': ' ...', 'rejected': ' ...'}
"""

from __future__ import annotations

import csv
import math
import random

from twintune.data.synthetic import synthetic_financial_sentiment
from twintune.data.chat import render_row
from twintune.errors import TwintuneError

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")
PROMPTS = ("prompt",)
SYNTHETIC_PROMPT = "Sentence: {text}\nSentiment:"
SYNTHETIC_STREAM = 40_000  # the synthetic preference sentences: apart from the labelled sets' and the corpus'
LABELS = ("negative", "neutral", "positive")


def load_rows(source: str, columns: tuple[str, ...], *, synthetic_size: int = 1500, seed: int = 0,
              split: str = "train", config: str = "", synthetic: str = "openings",
              numbers: tuple[str, ...] = (), chat: dict | None = None) -> list[dict]:
    """The rows of a preference source, each a dict of `columns` (text, or a bool `label`), and of the
    optional number columns `numbers` where the source has them (a reward model's `margin`: then in
    every row). Chat-message columns (TRL's conversational format) are rendered to text with the
    tokenizer's chat template `chat` (data/chat.py; such a row has "conversational": True), and refused
    by name where there is none. A missing column is refused naming the columns there are, an empty
    text or a number that is not one by its row.

    Example:
        >>> [sorted(row) for row in load_rows("synthetic", PAIRED, synthetic_size=1)]
        [['chosen', 'prompt', 'rejected']]
    """
    if source == "synthetic":
        if columns == PROMPTS:  # `synthetic`: openings to continue, or the pairs' sentiment questions
            if synthetic == "questions":
                return [{"prompt": row["prompt"], "label": row["chosen"].strip()}
                        for row in synthetic_pairs(synthetic_size, seed)]
            return synthetic_prompts(synthetic_size, seed)
        return synthetic_unpaired(synthetic_size, seed) if columns == UNPAIRED else \
            [{k: row[k] for k in columns} for row in synthetic_pairs(synthetic_size, seed)]
    table, where = _read(source, split, config)
    if not table:
        raise TwintuneError(f"{where} holds no rows.")
    present = list(table[0][1])
    for column in columns:
        if column not in present:
            raise TwintuneError(f"{where} has no column '{column}' (its columns are {', '.join(present) or '(none)'}); "
                                f"this task reads {', '.join(columns)}, TRL's names.")
    keep = columns == PROMPTS  # a prompt's other columns go to GRPO's reward function
    given = [column for column in numbers if column in present]
    texts = tuple(column for column in columns if column != "label")
    rows = []
    for number, row in table:
        if any(isinstance(row.get(column), list) for column in texts):
            row = render_row(row, chat, texts, f"{where} row {number}")
        rows.append({**({k: v for k, v in row.items() if k not in columns} if keep else {}),
                     **{column: _value(row.get(column), column, where, number) for column in columns},
                     **{column: _number(row.get(column), column, where, number) for column in given},
                     **({"conversational": True} if row.get("conversational") else {})})
    return rows


def _number(value, column: str, where: str, number: int) -> float:
    """A finite number (CSV's text of one too)."""
    try:
        found = float(value)
    except (TypeError, ValueError):
        found = float("nan")
    if isinstance(value, bool) or not math.isfinite(found):
        raise TwintuneError(f"{where} row {number} has {column} {value!r}; it must be a finite number.")
    return found


def _read(source: str, split: str, config: str) -> tuple[list[tuple[int, dict]], str]:
    """(line or row number, row) of a file or data set, and how a refusal names it."""
    from twintune.data.sources import HUB_PREFIX, LOCAL_EXTENSIONS, json_lines, load_table, open_text

    if source.endswith(".jsonl"):
        with open_text(source) as handle:
            return list(json_lines(handle, source)), source
    if source.endswith(".csv"):
        with open_text(source) as handle:
            reader = csv.DictReader(handle)
            return [(reader.line_num, row) for row in reader], source
    if not (source.startswith(HUB_PREFIX) or source.endswith(LOCAL_EXTENSIONS)) or source.endswith(".txt"):
        raise TwintuneError(f"data.source {source!r} is not a preference source: use synthetic, a .jsonl, .csv, .json "
                            "or .parquet file, or hf:ORG/NAME.")
    table = load_table(source, {}, split, config)
    where = f"data set '{source}' (split '{split}')" if source.startswith(HUB_PREFIX) else source
    return list(enumerate(table, start=1)), where


def _value(value, column: str, where: str, number: int):
    if column == "label":
        return _desirable(value, where, number)
    if not isinstance(value, str) or (column != "prompt" and not value.strip()):
        raise TwintuneError(f"{where} row {number} has an empty '{column}'.")
    return value


def _desirable(value, where: str, number: int) -> bool:
    """A KTO label: true/false (CSV's strings "true"/"false"/"1"/"0" too)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise TwintuneError(f"{where} row {number} has label {value!r}; a KTO label is true (a desirable completion) "
                        "or false.")


def answer(prompt: str, text: str, conversational: bool = False) -> str:
    """An answer as it follows its prompt: with a space between them unless one has it (as TRL's
    plain-text rows are concatenated, the space being the writer's); a chat template's rendering
    as it is."""
    if conversational:
        return text
    return text if text[:1].isspace() or prompt[-1:].isspace() or not prompt else " " + text


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` preference pairs from the synthetic financial sentences: the prompt asks a sentence's
    sentiment; chosen names it, rejected names one of the other two (drawn with the seed)."""
    rng = random.Random(SYNTHETIC_STREAM + seed)
    pairs = []
    for example in synthetic_financial_sentiment(n=n, seed=SYNTHETIC_STREAM + seed):
        wrong = rng.choice([label for label in LABELS if label != example.label])
        pairs.append({"prompt": SYNTHETIC_PROMPT.format(text=example.text), "chosen": f" {example.label}",
                      "rejected": f" {wrong}"})
    return pairs


def synthetic_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` openings of synthetic financial sentences (their first three words) to continue, each with its
    sentence's sentiment as a `label` column.

    Example:
        >>> synthetic_prompts(1, seed=0)
        [{'prompt': '...', 'label': '...'}]
    """
    return [{"prompt": " ".join(example.text.split()[:3]), "label": example.label}
            for example in synthetic_financial_sentiment(n=n, seed=SYNTHETIC_STREAM + seed)]


def synthetic_unpaired(n: int, seed: int = 0) -> list[dict]:
    """`n` KTO rows from the synthetic pairs: every other row the chosen answer (desirable), the rest the
    rejected one (undesirable)."""
    return [{"prompt": pair["prompt"], "completion": pair["chosen"] if i % 2 == 0 else pair["rejected"],
             "label": i % 2 == 0} for i, pair in enumerate(synthetic_pairs(n, seed))]
