"""Unlabelled text for the causal-LM task: documents in, training rows out.

Documents come from `synthetic` (a stream of the synthetic generator's sentences, texts only, apart
from the labelled set's), a `.txt` file (one document per line), a `.jsonl` file (its
`data.text_column`), or anything `datasets` reads (`hf:ORG/NAME`, `.parquet`, `.json`).

Rows: with packing (the default), the documents' tokens, each document followed by the
end-of-text token, are one stream cut into rows of `length` tokens, as mlx-lm and transformers'
`group_texts` do; every token but a row's first is a target. Without packing, each document
(with its end-of-text token) starts a row of its own, cut into `length`-token pieces if longer,
and batches pad to their longest row.

Example:
    >>> pack([[5, 6, 7], [8, 9]], length=4, eos=0)
    [array([5, 6, 7, 0], dtype=int32), array([8, 9, 0], dtype=int32)]
"""

from __future__ import annotations

import numpy as np

from twintune.data.batching import Encoded
from twintune.data.synthetic import synthetic_financial_sentiment
from twintune.errors import TwintuneError

CORPUS_SEED = 30_000  # the synthetic documents: a stream apart from the labelled sets' and the pre-training's


def load_documents(source: str, *, text_column: str = "text", synthetic_size: int = 1500, seed: int = 0,
                   split: str = "train", config: str = "") -> list[str]:
    """The documents of a source, in file order; an empty one is refused with its line.

    Example:
        >>> len(load_documents("synthetic", synthetic_size=40))
        40
    """
    if source == "synthetic":
        return [e.text for e in synthetic_financial_sentiment(n=synthetic_size, seed=CORPUS_SEED + seed)]
    if source.endswith(".txt"):
        documents = _read_lines(source)
    elif source.endswith(".jsonl"):
        documents = _read_jsonl(source, text_column)
    else:
        from twintune.data.sources import HUB_PREFIX, LOCAL_EXTENSIONS, load_table

        if not (source.startswith(HUB_PREFIX) or source.endswith(LOCAL_EXTENSIONS)):
            raise TwintuneError(f"data.source {source!r} is not a text source for task causal_lm: use synthetic, a .txt "
                                "file (one document per line), .jsonl, .json, .parquet or hf:ORG/NAME.")
        documents = [_document(row.get(text_column), source, number, text_column)
                     for number, row in enumerate(load_table(source, {text_column: "data.text_column"}, split, config), start=1)]
    if not documents:
        raise TwintuneError(f"{source} holds no documents.")
    return documents


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise TwintuneError(f"data file {path} does not exist.") from None
    except UnicodeDecodeError as error:
        raise TwintuneError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None
    return [_document(line, path, number, "text") for number, line in enumerate(lines, start=1) if line != ""]


def _read_jsonl(path: str, text_column: str) -> list[str]:
    from twintune.data.sources import json_lines, open_text

    documents = []
    with open_text(path) as handle:
        for number, row in json_lines(handle, path):
            if text_column not in row:
                raise TwintuneError(f"{path} line {number} has no key '{text_column}' (data.text_column).")
            documents.append(_document(row[text_column], path, number, text_column))
    return documents


def _document(text, name: str, number: int, column: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TwintuneError(f"{name} document {number} is empty (its '{column}' has no text).")
    return text


def pack(documents: list[list[int]], length: int, eos: int) -> list[np.ndarray]:
    """One stream of every document's tokens, each followed by `eos`, cut into rows of `length` (a
    last row of one token is dropped: it has nothing to predict)."""
    stream = np.fromiter((t for doc in documents for t in (*doc, eos)), np.int32)
    rows = [stream[start: start + length] for start in range(0, len(stream), length)]
    return [row for row in rows if len(row) >= 2]


def one_per_row(documents: list[list[int]], length: int, eos: int) -> list[np.ndarray]:
    """Each document (+ `eos`) in rows of its own, cut into `length`-token pieces if longer."""
    rows = []
    for doc in documents:
        tokens = np.array([*doc, eos], np.int32)
        rows += [tokens[start: start + length] for start in range(0, len(tokens), length)]
    return [row for row in rows if len(row) >= 2]


def lm_rows(rows: list[np.ndarray]) -> list[Encoded]:
    """Rows as the batcher takes them: the first token is the "prompt", every later one a target."""
    return [Encoded(row, 1, 0) for row in rows]


SPLIT_STREAM = 2**31 - 7  # default_rng([seed, SPLIT_STREAM]) shuffles generative tasks' rows into splits


def random_splits(n: int, validation_fraction: float, test_fraction: float, seed: int, source: str,
                  what: str) -> dict[str, np.ndarray]:
    """Indices of n items shuffled by the seed into validation (at least one), test and train, each
    in the items' own order.

    Example:
        >>> {k: v.tolist() for k, v in random_splits(5, 0.2, 0.2, 0, "docs.txt", "documents").items()}
        {'validation': [...], 'test': [...], 'train': [...]}
    """
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    n_validation = max(1, round(validation_fraction * n))
    n_test = round(test_fraction * n)
    if n - n_validation - n_test < 1:
        raise TwintuneError(f"{source} has {n} {what}: too few to leave any for training after the validation and "
                            "test splits.")
    parts = {"validation": order[:n_validation], "test": order[n_validation:n_validation + n_test],
             "train": order[n_validation + n_test:]}
    return {split: np.sort(idx) for split, idx in parts.items()}


def eos_id(tokenizer) -> int:
    """The end-of-text token between packed documents and after a completion."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    if eos is None:
        raise TwintuneError("the tokenizer has no <|endoftext|> token to end documents and completions with.")
    return eos
