"""Classification: the recipe's method learns to classify sentences, scored by label words (the
verbalizer, the default) or by a linear head on the last prompt token (`head: linear`).

The head is one more INSERT surgery (methods/base.py), into the model's `score` slot; both
backends' `logits(h)` then give class scores instead of vocabulary scores, so the training step,
evaluation and prediction are the verbalizer's with the classes in place of the label words
(data/batching.py: an example is its prompt alone, its one target the class). It is transformers'
GPTNeoForSequenceClassification's `score` (no bias) and PEFT's SEQ_CLS `modules_to_save` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.methods.base import INSERT, Layer, Plan, Surgery
from twintune.tasks.task import Labelled, refuse_general_text

HEAD = "score.weight"  # transformers' GPTNeoForSequenceClassification and PEFT's SEQ_CLS name
HEAD_SLOT = "score"
HEAD_INIT_STD = 0.02  # transformers' initializer_range for GPT-Neo: score ~ N(0, 0.02)
HEAD_STREAM = 0x4EAD  # the head's initial values are drawn from (seed, HEAD_STREAM): not the method's draws


@dataclass(frozen=True, eq=False)
class LinearHeadLayer(Layer):
    """A (labels x width) linear layer, no bias, in the model's `score` slot."""


@dataclass(frozen=True)
class Classification(Labelled):
    """Train the recipe's method to classify; `head` verbalizer (label words) or linear (a new layer)."""

    head: str = "verbalizer"

    name: ClassVar[str] = "classification"
    description: ClassVar[str] = "train the method to classify: label words (verbalizer) or a linear head"

    def validate(self) -> None:
        check(self.head in ("verbalizer", "linear"),
              f"recipe key 'task.head' must be verbalizer or linear, got {self.head!r}.")

    @property
    def linear_head(self) -> bool:
        return self.head == "linear"

    def surgeries(self, spec, labels: int, seed: int) -> tuple[Surgery, ...]:
        return (head_surgery(labels, spec.hidden_size, seed),) if self.linear_head else ()

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        if self.linear_head:
            refuse_general_text(recipe, "replaces with a classification head")

    def check_trains_something(self, recipe) -> None:
        if recipe.method.name == "none" and not self.linear_head:
            raise TwintuneError("method none trains nothing with the verbalizer: set task.head to linear to train a "
                                "classification head alone, use task features, or evaluate the untrained model with "
                                "`twintune eval RECIPE --shots K`.")

    def shots_refusal(self) -> str | None:
        if self.linear_head:
            return ("--shots puts labelled sentences with their label words before each sentence, but this run "
                    "classifies with a linear head, which reads no label words; evaluate it without --shots")
        return None


def head_surgery(num_labels: int, hidden_size: int, seed: int) -> Surgery:
    """The head as a surgery: (num_labels, hidden_size) values ~ N(0, 0.02) drawn from the seed, in
    the model's `score` slot (LinearHeadLayer: backends/X/methods/head.py builds it).

    Example:
        >>> head_surgery(3, 64, seed=0).values["score.weight"].shape
        (3, 64)
    """
    rng = np.random.default_rng([seed, HEAD_STREAM])
    weight = (rng.standard_normal((num_labels, hidden_size)) * HEAD_INIT_STD).astype(np.float32)
    return Surgery(INSERT, HEAD_SLOT, {HEAD: weight}, LinearHeadLayer())


def with_head(plan: Plan, surgery: Surgery) -> Plan:
    """The method's plan with the head's surgery added (the head trains at the step's lr)."""
    return Plan(plan.method, plan.surgeries + (surgery,), plan.lr_scales)


def split_head(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(the method's values, the head's weight or None)."""
    rest = {k: v for k, v in state.items() if k != HEAD}
    return rest, state.get(HEAD)


def check_head_labels(head: np.ndarray, saved: list[str] | None, labels: Sequence[str], where: Path) -> None:
    """A trained head scores the labels it was trained on, in their order: any other set is refused."""
    if saved is not None and list(saved) != list(labels):
        raise TwintuneError(f"the classification head in {where} was trained on labels {saved}, but the labels now "
                            f"given (prompt.labels) are {list(labels)}; a head's rows are its labels, so give the "
                            "labels it was trained on, in their order, or train a new head.")
    if head.shape[0] != len(labels):
        raise TwintuneError(f"the classification head in {where} scores {head.shape[0]} labels, but {len(labels)} "
                            f"labels are given ({', '.join(labels)}); give the labels it was trained on.")
