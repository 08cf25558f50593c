"""What every task is: a strategy the loop calls instead of asking which task it has.

A task is its recipe keys as a dataclass (checked by name and value in tasks/__init__.py) and the
answers to what a run needs of it:

- `data`: its train, validation and test rows from the recipe's `data` section (its loss is
  in them: each row's targets, the label word's position or a span of next tokens);
- `surgeries`: what it trains besides the method (the linear head);
- `evaluate`: a typed report (tasks/reports.py) of a split, from a `Scorer` the run gives;
- `metrics`: the figures it logs, which early stopping may watch;
- `check_recipe`: the rules between its keys and the rest of the recipe;
- refusals, as sentences, for what a run of it cannot do (few-shot prompts, predicting labels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from twintune.data.batching import Encoded, Encoder
from twintune.data.examples import Example
from twintune.data.sources import load_examples, stratified_split
from twintune.errors import TwintuneError
from twintune.methods.base import Surgery
from twintune.tasks.reports import ClassificationReport, PerplexityReport, Report

SPLITS = ("train", "validation", "test")


@dataclass
class TaskData:
    """A task's rows per split, and for labelled tasks the sentences they were encoded from (few-shot
    prompts and retrieval read them)."""

    splits: dict[str, list[Encoded]]
    examples: dict[str, list[Example]] = field(default_factory=dict)


class Scorer(Protocol):
    """What a task's evaluation asks of a run (train/evaluate.py's RunScorer gives it)."""

    labels: list[str]

    def rows(self, split: str) -> list[Encoded]:
        """A split's rows."""

    def sources(self, split: str) -> dict[str, list[Encoded]]:
        """A mixture's split, by source (empty without a mixture)."""

    def class_scores(self, split: str) -> np.ndarray:
        """(rows, labels) log-probabilities of a split's classes."""

    def token_loss(self, rows: list[Encoded]) -> tuple[float, int]:
        """The summed cross-entropy of the rows' target tokens, and how many there are."""

    def objective_sums(self, split: str, objective) -> tuple[np.ndarray, int]:
        """An objective's summed loss and figures over a split (no dropout, no gradient), and how many
        examples (pairs) they sum over."""


class Task:
    """A recipe's `task:` section: a dataclass whose fields are its keys (with defaults)."""

    name: ClassVar[str]
    description: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # what a run logs at each evaluation; train.early_stopping_metric names one
    mixes: ClassVar[bool] = False  # whether data.mixture may mix sources of it
    trains_method: ClassVar[bool] = True  # False: the model stays frozen (its recipe's method defaults to none)
    cannot_predict: ClassVar[str | None] = None  # why `twintune predict` has no labels for a run of it
    rows_per_example: ClassVar[int] = 1  # a preference pair is two rows (chosen, rejected)
    # What `twintune doctor` judges a run's course by where not the loss (a step figure that should
    # rise: a policy loss hovers at 0 by design), and why no gradient would reach the method.
    progress: ClassVar[str | None] = None
    no_gradient: ClassVar[str] = "the method's layers may be ones the loss does not read"
    # A preference task's reference computed once per split (train/references.py): another run's
    # directory (reference), or the base with the method off (precompute_reference).
    reference: str = ""
    precompute_reference: bool = False
    reward_model: str = ""  # a reward run whose head scores sampled completions (train/build.py opens it)
    # Its loss when it is not the sum of its rows' target-token cross-entropies (tasks/objectives.py).
    objective: ClassVar[object | None] = None
    # Whether it trains on rollouts it samples and keeps for several optimizer steps (PPO: train/rollouts.py).
    learns_from_rollouts: ClassVar[bool] = False

    @classmethod
    def no_gradient_tries(cls, keys: dict) -> tuple[str, ...]:
        """`--set` values `twintune doctor` offers when no gradient reached the method, given the run's
        task keys (as recipe.json holds them): none where the cause is the data or the model."""
        return ()

    def validate(self) -> None:
        """Range checks on the keys (types are checked when the recipe is read)."""

    def check_recipe(self, recipe) -> None:
        """The rules between the task's keys and the rest of a recipe (recipe.py calls it)."""

    def check_trains_something(self, recipe) -> None:
        """Training a recipe needs something to train (loading one without is fine: the untrained model)."""
        if recipe.method.name == "none":
            raise TwintuneError(f"method none trains nothing for task {self.name}: name a method (lora, ...).")

    def shots_refusal(self) -> str | None:
        """Why --shots (labelled sentences with their label words before each sentence) cannot apply to a
        run of it, or None."""
        return None

    @property
    def linear_head(self) -> bool:
        """Whether it trains a linear classification head besides the method."""
        return False

    def head_labels(self, recipe) -> list[str] | None:
        """What the rows of its linear head score (None: no head): saved beside the adapter."""
        return list(recipe.prompt.labels) if self.linear_head else None

    def optimizer_steps(self, data_steps: int) -> int:
        """How many optimizer steps `data_steps` steps of its training order make (PPO's rollouts train
        several epochs on theirs)."""
        return data_steps

    @property
    def trains_in_steps(self) -> bool:
        """Whether a run of it trains in optimizer steps (checkpoints, resume, several processes); the
        features task fits its classifier once instead."""
        return True

    def data(self, data, seed: int, encoder: Encoder, length: int) -> TaskData:
        """Its train, validation and test rows from the recipe's `data` section, split with `seed`;
        rows of at most `length` tokens."""
        raise NotImplementedError

    def surgeries(self, spec, labels: int, seed: int) -> tuple[Surgery, ...]:
        """What it puts on the model (of `spec`) besides the method (a head for `labels` classes), drawn
        from the seed."""
        return ()

    def evaluate(self, scorer: Scorer, split: str) -> Report:
        """Its report on a split."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


class Labelled(Task):
    """A task of labelled sentences (classification, features): stratified splits, scored by accuracy
    and macro-F1."""

    metrics: ClassVar[tuple[str, ...]] = ("val_accuracy", "val_macro_f1")

    def data(self, data, seed: int, encoder: Encoder, length: int) -> TaskData:
        """The recipe's labelled sentences, split per label by the seed, each encoded with the prompt."""
        examples = load_examples(data.source, subset=data.subset, text_column=data.text_column,
                                 label_column=data.label_column, labels=tuple(encoder.prompt.labels),
                                 synthetic_size=data.synthetic_size, seed=seed, split=data.split, config=data.config)
        examples = stratified_split(examples, {"validation": data.validation_fraction, "test": data.test_fraction}, seed)
        splits = {name: encoder.encode_all(part, name) for name, part in examples.items()}
        if not splits["validation"]:
            raise TwintuneError("the validation split is empty; raise data.validation_fraction or add examples.")
        return TaskData(splits, examples)

    def evaluate(self, scorer: Scorer, split: str) -> ClassificationReport:
        scores = scorer.class_scores(split)
        truth = np.array([e.label for e in scorer.rows(split)])
        return ClassificationReport.of(truth, scores.argmax(axis=1), scorer.labels)

    def check_recipe(self, recipe) -> None:
        if recipe.data.mixture:
            raise TwintuneError(f"data.mixture mixes generative tasks (causal_lm, instruction); task {self.name} "
                                "trains on one data.source.")


class Generative(Task):
    """A task trained on next tokens (causal LM, instruction): it makes its own splits and is scored by
    loss and perplexity (a mixture's sources each beside the whole's)."""

    metrics: ClassVar[tuple[str, ...]] = ("val_loss", "val_perplexity")
    mixes: ClassVar[bool] = True
    cannot_predict: ClassVar[str | None] = ("it predicts next tokens, not labels; evaluate its perplexity with "
                                            "twintune eval, or merge it and use the result as a recipe's model")

    def shots_refusal(self) -> str:
        return f"--shots puts labelled sentences before each sentence; a {self.name} run has no labels (evaluate its perplexity without --shots)"

    def splits(self, data, seed: int, tokenizer, length: int, chat: dict | None = None) -> dict[str, list[Encoded]]:
        """Its train, validation and test rows (data/batching.Encoded) from a `data` section (a
        mixture's source has its own), at most `length` tokens each."""
        raise NotImplementedError

    def data(self, data, seed: int, encoder: Encoder, length: int) -> TaskData:
        return TaskData(self.splits(data, seed, encoder.tokenizer, length, chat=encoder.chat))

    def evaluate(self, scorer: Scorer, split: str) -> PerplexityReport:
        sources = {name: PerplexityReport.of(*scorer.token_loss(rows)) for name, rows in scorer.sources(split).items()
                   if rows}
        return PerplexityReport.of(*scorer.token_loss(scorer.rows(split)), sources)


def refuse_general_text(recipe, reason: str) -> None:
    """The guards that score general text with the model's vocabulary are refused, saying why (`reason`:
    what the task does with the vocabulary instead)."""
    t = recipe.train
    for key, used in (("train.replay", t.replay.fraction > 0), ("train.forgetting_eval", bool(t.forgetting_eval)),
                      ("train.ewc", t.ewc.weight > 0), ("train.distill", t.distill.weight > 0)):
        if used:
            raise TwintuneError(f"{key} scores general text with the model's vocabulary, which task {recipe.task.name} "
                                f"{reason}.")
