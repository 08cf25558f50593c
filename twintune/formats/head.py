"""A classification head in adapter files: its name there (PEFT's SEQ_CLS names in a PEFT layout)
and head_config.json, the labels its rows score (PEFT's adapter_config has no place for them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from twintune.errors import TwintuneError
from twintune.formats.safetensors_io import write_json
import numpy as np

from twintune.tasks.classification import HEAD, check_head_labels

HEAD_CONFIG = "head_config.json"  # beside a saved adapter: the labels its head's rows are


def head_file_name(layout: str, prompt_learning: bool) -> str:
    """The head's name in an adapter file: PEFT's for a SEQ_CLS adapter (`base_model.score.weight` for
    its prompt-learning methods, which wrap no tuner model), the model's own elsewhere."""
    if layout != "peft":
        return HEAD
    return "base_model.score.weight" if prompt_learning else "base_model.model.score.weight"


HEAD_FILE_NAMES = ("base_model.model.score.weight", "base_model.score.weight", "score.weight")


def write_head_config(directory: Path, labels: Sequence[str]) -> None:
    """Which label each row of a saved head scores (PEFT's adapter_config has no place for it)."""
    write_json(Path(directory) / HEAD_CONFIG, {"head": "linear", "labels": list(labels)})


def read_head_labels(directory: Path) -> list[str] | None:
    """The labels a saved head was trained on (None: the adapter says nothing, as PEFT's do not)."""
    path = Path(directory) / HEAD_CONFIG
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TwintuneError(f"{path} is not a head configuration (JSON with a list of labels).") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise TwintuneError(f"{path} must list the head's labels as strings.")
    return labels


def check_head_fits(state: dict[str, np.ndarray], wants_head: bool, labels: Sequence[str], where: Path) -> None:
    """A saved head goes with a recipe that classifies with one, over the labels it was trained on."""
    if (HEAD in state) != wants_head:
        has = "has a classification head" if HEAD in state else "has no classification head"
        raise TwintuneError(f"the adapter in {where} {has}, but the recipe's task.head is "
                            f"{'linear' if wants_head else 'verbalizer'}; use the recipe it was trained with.")
    if wants_head:
        check_head_labels(state[HEAD], read_head_labels(where), labels, where)
