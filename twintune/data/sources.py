"""Where labelled sentences come from: the built-in synthetic set, financial_phrasebank on the
Hugging Face hub, a local file (the original ``sentence@label`` text, CSV or JSONL), or anything
`datasets.load_dataset` reads: ``hf:ORG/NAME`` on the hub and local parquet or JSON files.

Everything here is plain Python + numpy; a data set is a list of :class:`Example`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from collections.abc import Iterable

import numpy as np

from twintune.data.examples import Example
from twintune.data.synthetic import synthetic_financial_sentiment
from twintune.errors import TwintuneError

FINANCIAL_PHRASEBANK_REPO = "takala/financial_phrasebank"
FINANCIAL_PHRASEBANK_ZIP = "data/FinancialPhraseBank-v1.0.zip"
FINANCIAL_PHRASEBANK_SUBSETS = {
    "sentences_allagree": "Sentences_AllAgree.txt",
    "sentences_75agree": "Sentences_75Agree.txt",
    "sentences_66agree": "Sentences_66Agree.txt",
    "sentences_50agree": "Sentences_50Agree.txt",
}
DEFAULT_LABELS = ("negative", "neutral", "positive")
BUILT_IN_EXTENSIONS = (".txt", ".csv", ".jsonl")
# extension -> the `datasets` builder that reads it (csv and jsonl have built-in readers as well)
DATASETS_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
LOCAL_EXTENSIONS = (".txt", ".csv", ".jsonl", ".parquet", ".json")
HUB_PREFIX = "hf:"


def load_examples(
    source: str,
    *,
    subset: str = "sentences_allagree",
    text_column: str = "text",
    label_column: str = "label",
    labels: tuple[str, ...] = DEFAULT_LABELS,
    synthetic_size: int = 1500,
    seed: int = 0,
    split: str = "train",
    config: str = "",
) -> list[Example]:
    """Load labelled sentences from ``source``.

    ``source`` is ``"synthetic"`` (the built-in offline set), ``"financial_phrasebank"`` (the hub
    data set, subset ``subset``), ``"hf:ORG/NAME"`` (a hub data set through `datasets`, its
    ``split`` and ``config``) or a path to a ``.txt`` (``sentence@label`` lines, latin-1),
    ``.csv`` (header row), ``.jsonl``, ``.json`` or ``.parquet`` file (the last two through
    `datasets`). Integer labels index into ``labels`` (financial_phrasebank's order:
    0=negative, 1=neutral, 2=positive), unless the column is a `datasets` ``ClassLabel``: then
    its names are the labels.

    Example:
        >>> examples = load_examples("synthetic", synthetic_size=30, seed=1)
        >>> len(examples), examples[0].label in ("negative", "neutral", "positive")
        (30, True)
    """
    if source == "synthetic":

        return synthetic_financial_sentiment(n=synthetic_size, seed=seed)
    if source == "financial_phrasebank":
        return _load_financial_phrasebank(subset, labels)
    if source.startswith(HUB_PREFIX):
        return load_with_datasets(source, text_column, label_column, labels, split=split, config=config)

    extension = os.path.splitext(source)[1].lower()
    if not os.path.exists(source):
        if extension in LOCAL_EXTENSIONS or os.sep in source:
            raise TwintuneError(f"data file '{source}' does not exist.")
        raise TwintuneError(
            f"unknown data source '{source}'; use 'synthetic', 'financial_phrasebank', 'hf:ORG/NAME' "
            "or a path to a .txt, .csv, .jsonl, .json or .parquet file."
        )
    if not os.path.isfile(source) or extension not in LOCAL_EXTENSIONS:
        raise TwintuneError(
            f"data file '{source}' has an unsupported type; use a .txt (sentence@label), "
            ".csv, .jsonl, .json or .parquet file."
        )
    if extension not in BUILT_IN_EXTENSIONS:
        return load_with_datasets(source, text_column, label_column, labels)
    if extension == ".txt":
        with open(source, encoding="latin-1") as handle:
            examples = _parse_phrasebank_lines(handle, source, labels)
    elif extension == ".csv":
        with open(source, encoding="utf-8-sig", newline="") as handle:
            examples = _parse_csv(handle, source, text_column, label_column, labels)
    else:
        with open(source, encoding="utf-8-sig") as handle:
            examples = _parse_jsonl(handle, source, text_column, label_column, labels)
    return _non_empty(examples, source)


def _load_financial_phrasebank(subset: str, labels: tuple[str, ...]) -> list[Example]:
    if subset not in FINANCIAL_PHRASEBANK_SUBSETS:
        raise TwintuneError(
            f"unknown financial_phrasebank subset '{subset}'; choose one of "
            f"{', '.join(FINANCIAL_PHRASEBANK_SUBSETS)}."
        )
    try:
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(
            repo_id=FINANCIAL_PHRASEBANK_REPO, filename=FINANCIAL_PHRASEBANK_ZIP, repo_type="dataset"
        )
    except Exception:
        # Offline mode, no network, hub errors: all mean the same thing to the user.
        raise TwintuneError(
            "the Hugging Face hub cannot be reached to download financial_phrasebank; pass a "
            "local file instead (the original Sentences_AllAgree.txt, or a CSV or JSONL with "
            "text/label columns)."
        ) from None

    wanted = FINANCIAL_PHRASEBANK_SUBSETS[subset]
    name = f"financial_phrasebank:{subset}"
    try:
        with zipfile.ZipFile(archive) as bundle:
            # Matched by basename: the folder name inside the zip is not part of the contract.
            members = [m for m in bundle.namelist() if os.path.basename(m) == wanted]
            if not members:
                raise TwintuneError(f"the financial_phrasebank archive has no file '{wanted}'.")
            text = bundle.read(members[0]).decode("latin-1")
    except zipfile.BadZipFile:
        raise TwintuneError(
            f"the downloaded financial_phrasebank archive '{archive}' is not a valid zip file."
        ) from None
    examples = _parse_phrasebank_lines(io.StringIO(text), name, labels)
    return _non_empty(examples, name)


def load_with_datasets(
    source: str,
    text_column: str,
    label_column: str,
    labels: tuple[str, ...],
    *,
    split: str = "train",
    config: str = "",
) -> list[Example]:
    """Labelled sentences through `datasets.load_dataset`: ``hf:ORG/NAME`` (its ``split`` and
    ``config``; no loading scripts, no remote code) or a local .parquet, .json, .jsonl or .csv file.
    A ``ClassLabel`` column's integer values become its names; other labels are read as by the
    built-in readers (names, or integers indexing ``labels``).

    Example:
        >>> import pandas, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "two.parquet")
        >>> pandas.DataFrame({"text": ["Sales rose .", "Costs fell ."], "label": [2, 0]}).to_parquet(path)
        >>> [e.label for e in load_with_datasets(path, "text", "label", ("negative", "neutral", "positive"))]
        ['positive', 'negative']
    """
    import datasets

    table = load_table(source, {text_column: "data.text_column", label_column: "data.label_column"}, split, config)
    where = f"data set '{source}' (split '{split}')" if source.startswith(HUB_PREFIX) else source
    feature = table.features[label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    examples = [
        _example(text, names[raw] if names is not None and raw is not None else raw, labels, where, row)
        for row, (text, raw) in enumerate(zip(table[text_column], table[label_column]), start=1)
    ]
    return _non_empty(examples, where)


def load_table(source: str, columns: dict[str, str], split: str = "train", config: str = ""):
    """A `datasets` table of ``hf:ORG/NAME`` (its ``split`` and ``config``; no loading scripts, no
    remote code) or of a local .parquet, .json, .jsonl or .csv file, with the ``columns`` checked (each
    mapped to the recipe key that names it, which a refusal mentions)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as one sentence below
    if source.startswith(HUB_PREFIX):
        name, where = source[len(HUB_PREFIX):], f"data set '{source}' (split '{split}')"
        try:
            table = datasets.load_dataset(name, config or None, split=split)
        except Exception as error:  # noqa: BLE001 - offline, unknown name or split, a script: one sentence
            raise TwintuneError(f"{where} cannot be loaded from the Hugging Face hub: "
                                f"{_first_line(error)}") from None
    else:
        if not os.path.exists(source):
            raise TwintuneError(f"data file {source} does not exist.")
        builder, where = DATASETS_BUILDERS[os.path.splitext(source)[1].lower()], source
        try:
            table = datasets.load_dataset(builder, data_files=source, split="train")
        except Exception as error:  # noqa: BLE001 - a file its reader cannot parse
            raise TwintuneError(f"{where} cannot be read as {builder}: {_first_line(error)}") from None
    for column, key in columns.items():
        if column not in table.column_names:
            raise missing_column(where, column, table.column_names, key)
    return table


def missing_column(where: str, column: str, columns: list[str], key: str) -> TwintuneError:
    """The sentence for a table without the column a recipe key names (the key says how to name another)."""
    return TwintuneError(f"{where} has no column '{column}'; its columns are {', '.join(columns) or '(none)'}; "
                         f"set {key} to the column that holds it.")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__).rstrip(".") + "."


def _parse_phrasebank_lines(
    lines: Iterable[str], name: str, labels: tuple[str, ...]
) -> list[Example]:
    examples = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if "@" not in line:
            raise TwintuneError(
                f"{name} line {number} has no '@' between sentence and label: {line[:60]!r}."
            )
        # The sentence itself may contain '@'; the label never does.
        text, raw_label = line.rsplit("@", 1)
        examples.append(_example(text, raw_label, labels, name, number))
    return examples


def _parse_csv(
    handle, name: str, text_column: str, label_column: str, labels: tuple[str, ...]
) -> list[Example]:
    reader = csv.DictReader(handle)
    columns = reader.fieldnames or []
    for column, key in ((text_column, "data.text_column"), (label_column, "data.label_column")):
        if column not in columns:
            raise missing_column(name, column, columns, key)
    return [
        _example(row[text_column], row[label_column], labels, name, reader.line_num)
        for row in reader
    ]


def _parse_jsonl(
    handle, name: str, text_column: str, label_column: str, labels: tuple[str, ...]
) -> list[Example]:
    examples = []
    for number, row in json_lines(handle, name):
        for column in (text_column, label_column):
            if column not in row:
                key = "data.text_column" if column == text_column else "data.label_column"
                raise TwintuneError(f"{name} line {number} has no key '{column}'; set {key} to the key that holds it.")
        examples.append(_example(row[text_column], row[label_column], labels, name, number))
    return examples


def json_lines(lines: Iterable[str], name: str) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
    object is refused with its number."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TwintuneError(f"{name} line {number} is not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            raise TwintuneError(f"{name} line {number} is not a JSON object.")
        yield number, row


def open_text(path: str):
    """A UTF-8 text file opened for reading, or the sentence that it does not exist."""
    try:
        return open(path, encoding="utf-8")
    except FileNotFoundError:
        raise TwintuneError(f"data file {path} does not exist.") from None


def _example(text, raw_label, labels: tuple[str, ...], name: str, number: int) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise TwintuneError(f"{name} line {number} has an empty text.")
    return Example(text=text.strip(), label=_label(raw_label, labels, name, number))


def _label(raw, labels: tuple[str, ...], name: str, number: int) -> str:
    allowed = ", ".join(labels)
    # CSV gives every value as a string, so "2" is read as the integer class 2.
    is_integer = isinstance(raw, int) and not isinstance(raw, bool)
    if is_integer or isinstance(raw, str) and raw.strip().isdigit():
        index = int(raw)
        if index < len(labels):
            return labels[index]
        raise TwintuneError(
            f"{name} line {number} has label {index}, but integer labels must be "
            f"0..{len(labels) - 1} ({allowed})."
        )
    if isinstance(raw, str):
        by_lower = {label.lower(): label for label in labels}
        if raw.strip().lower() in by_lower:
            return by_lower[raw.strip().lower()]
    raise TwintuneError(f"{name} line {number} has unknown label {raw!r}; allowed labels are {allowed}.")


def _non_empty(examples: list[Example], name: str) -> list[Example]:
    if not examples:
        raise TwintuneError(f"{name} contains no examples.")
    return examples


def stratified_split(
    examples: list[Example], fractions: dict[str, float], seed: int
) -> dict[str, list[Example]]:
    """Split ``examples`` into ``"train"`` plus one split per entry of ``fractions``, per label.

    Each split keeps the class proportions; a split with a fraction > 0 gets at least one example
    of every class that has 3 or more. The same seed gives the same splits, each shuffled.

    Example:
        >>> data = load_examples("synthetic", synthetic_size=300, seed=0)
        >>> splits = stratified_split(data, {"validation": 0.1, "test": 0.1}, seed=0)
        >>> {name: len(part) for name, part in splits.items()}
        {'train': 240, 'validation': 30, 'test': 30}
    """
    if "train" in fractions:
        raise TwintuneError(
            "split fractions must not name 'train'; train gets what the other splits leave."
        )
    for name, fraction in fractions.items():
        if not 0.0 <= fraction < 1.0:
            raise TwintuneError(f"split fraction for '{name}' is {fraction}; it must be in [0, 1).")
    if sum(fractions.values()) >= 1.0:
        raise TwintuneError(
            f"split fractions sum to {sum(fractions.values()):g}; they must sum to less than 1 "
            "to leave a train split."
        )

    rng = np.random.default_rng(seed)
    names = list(fractions)
    splits: dict[str, list[Example]] = {"train": [], **{name: [] for name in names}}
    for label in sorted({example.label for example in examples}):
        members = [example for example in examples if example.label == label]
        order = rng.permutation(len(members))
        counts = [_split_count(fractions[name], len(members)) for name in names]
        # Keep at least one example of the class in train.
        while sum(counts) > len(members) - 1 and max(counts, default=0) > 0:
            counts[counts.index(max(counts))] -= 1
        start = 0
        for name, count in zip(names, counts):
            splits[name].extend(members[i] for i in order[start : start + count])
            start += count
        splits["train"].extend(members[i] for i in order[start:])
    for name, part in splits.items():
        splits[name] = [part[i] for i in rng.permutation(len(part))]
    return splits


def _split_count(fraction: float, size: int) -> int:
    count = int(round(fraction * size))
    if fraction > 0 and size >= 3:
        count = max(count, 1)
    return count


def naive_bayes_unigram_accuracy(train: list[Example], test: list[Example]) -> float:
    """Accuracy on ``test`` of a multinomial naive Bayes on lowercase whitespace unigrams.

    A keyword baseline: the synthetic set is built so that this stays well below a model that
    sees word interactions.

    Example:
        >>> data = load_examples("synthetic", synthetic_size=600, seed=0)
        >>> 0.0 <= naive_bayes_unigram_accuracy(data[:500], data[500:]) <= 1.0
        True
    """
    if not train or not test:
        raise TwintuneError("naive Bayes needs a non-empty train and test set.")
    classes = sorted({example.label for example in train})
    class_index = {label: i for i, label in enumerate(classes)}
    vocabulary: dict[str, int] = {}
    for example in train:
        for word in example.text.lower().split():
            vocabulary.setdefault(word, len(vocabulary))

    counts = np.zeros((len(classes), len(vocabulary)))
    priors = np.zeros(len(classes))
    for example in train:
        row = class_index[example.label]
        priors[row] += 1
        for word in example.text.lower().split():
            counts[row, vocabulary[word]] += 1
    log_prior = np.log(priors / priors.sum())
    # Laplace smoothing so a word unseen in one class does not veto it.
    log_likelihood = np.log((counts + 1) / (counts.sum(axis=1, keepdims=True) + len(vocabulary)))

    correct = 0
    for example in test:
        ids = [vocabulary[w] for w in example.text.lower().split() if w in vocabulary]
        scores = log_prior + log_likelihood[:, ids].sum(axis=1)
        correct += classes[int(np.argmax(scores))] == example.label
    return correct / len(test)
