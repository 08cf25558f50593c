"""What every task shares: its recipe keys as a dataclass, checked by name and value (tasks/__init__.py),
and what the loop asks of it instead of asking which task it is: whether it trains in steps, the
figures it logs and early stopping may watch, and what summary.json keeps of its final report."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


class Task:
    """A recipe's `task:` section: a dataclass whose fields are its keys (with defaults)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def validate(self) -> None:
        """Range checks on the keys (types are checked when the recipe is read)."""

    @property
    def linear_head(self) -> bool:
        return False

    @property
    def generative(self) -> bool:
        """Trained on next tokens (causal LM, instruction) and scored by loss and perplexity; such a task
        makes its own splits (`splits`)."""
        return False

    @property
    def trains_in_steps(self) -> bool:
        """Whether a run of it trains in optimizer steps (checkpoints, resume, several processes); the
        features task fits its classifier once instead."""
        return True

    @property
    def metrics(self) -> tuple[str, ...]:
        """The figures a run logs at each evaluation, which train.early_stopping_metric may name."""
        return ("val_accuracy", "val_macro_f1")

    def logged(self, report: dict) -> dict:
        """What a run logs of an evaluation report (train/evaluate.py)."""
        return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}

    def summary_fields(self, report: dict) -> dict:
        """What summary.json keeps of the final report beside the logged figures."""
        return {"val_per_class": report["per_class"], "val_confusion": report["confusion"], "labels": report["labels"]}

    def splits(self, data, seed: int, tokenizer, length: int) -> dict:
        """A generative task's train, validation and test rows (lists of data.batching.Encoded) from the
        recipe's `data` section, at most `length` tokens each."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


class Generative(Task):
    """A task trained on next tokens (causal LM, instruction): it makes its own splits and is scored by
    loss and perplexity (a mixture's sources each beside the whole's)."""

    @property
    def generative(self) -> bool:
        return True

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("val_loss", "val_perplexity")

    def logged(self, report: dict) -> dict:
        per_source = {f"val_{key}/{name}": figures[key] for name, figures in report.get("sources", {}).items()
                      for key in ("loss", "perplexity")}
        return {"val_loss": report["loss"], "val_perplexity": report["perplexity"], **per_source}

    def summary_fields(self, report: dict) -> dict:
        return {}


