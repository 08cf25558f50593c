"""What an evaluation says, typed: a labelled task's classification report, a generative task's
perplexity report. Each report knows what a run logs of it (`logged`), what summary.json keeps
beside that (`summary_fields`), its JSON form (`to_dict`) and its readable table (`lines`), so
nothing outside tasks/ tells reports apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ClassificationReport:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows: true class,
    columns: predicted) of predicted against true classes. With shots (in-context examples before
    each sentence): how many were asked and used, and, when they were retrieved by similarity, the
    random shots' report beside.

    Example:
        >>> report = ClassificationReport.of(np.array([0, 1, 2]), np.array([0, 1, 1]), ["neg", "neu", "pos"])
        >>> report.accuracy, report.confusion[2]
        (0.6666666666666666, [0, 1, 0])
    """

    labels: list[str]
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict]
    confusion: list[list[int]]
    predictions: list[int]
    shots: int | None = None
    shots_asked: int | None = None
    shots_note: str | None = None
    retrieved: bool = False
    random_shots: "ClassificationReport | None" = None

    @classmethod
    def of(cls, truth: np.ndarray, predictions: np.ndarray, labels: Sequence[str]) -> "ClassificationReport":
        """The report of predicted against true class indices (`confusion[i][j]` counts true i predicted j)."""
        k = len(labels)
        confusion = np.zeros((k, k), np.int64)
        np.add.at(confusion, (np.asarray(truth, np.int64), np.asarray(predictions, np.int64)), 1)
        true_pos = np.diag(confusion).astype(float)
        predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
        precision = np.divide(true_pos, predicted, out=np.zeros(k), where=predicted > 0)
        recall = np.divide(true_pos, actual, out=np.zeros(k), where=actual > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
        per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                            "support": int(actual[i])} for i, name in enumerate(labels)}
        return cls(list(labels), float(true_pos.sum() / max(1, len(truth))), float(f1.mean()), per_class,
                   confusion.tolist(), np.asarray(predictions).tolist())

    def with_shots(self, used: int, asked: int, note: str | None) -> "ClassificationReport":
        return replace(self, shots=used, shots_asked=asked, shots_note=note)

    def logged(self) -> dict:
        """What a run logs of it at an evaluation (the figures early stopping may watch)."""
        return {"val_accuracy": self.accuracy, "val_macro_f1": self.macro_f1}

    def summary_fields(self) -> dict:
        """What summary.json keeps of the final report beside the logged figures."""
        return {"val_per_class": self.per_class, "val_confusion": self.confusion, "labels": self.labels}

    def to_dict(self, predictions: bool = True) -> dict:
        """The report as JSON values; shot fields only when shots were used."""
        values = {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_class": self.per_class,
                  "confusion": self.confusion, "labels": self.labels}
        if predictions:
            values["predictions"] = self.predictions
        if self.shots is not None:
            values.update(shots=self.shots, shots_asked=self.shots_asked, shots_note=self.shots_note)
        if self.retrieved:
            values["retrieved"] = True
        if self.random_shots is not None:
            values["random_shots"] = {key: value for key, value in self.random_shots.to_dict(predictions).items()
                                      if key in ("accuracy", "macro_f1", "shots", "predictions")}
        return values

    def lines(self, split: str, examples: int, backend: str) -> list[str]:
        """A readable table: the headline, per-class figures, the confusion matrix (and the shots)."""
        width = max(len(label) for label in self.labels) + 2
        shots = f", {self.shots} shots of each class" if self.shots is not None else ""
        shots += ", retrieved by similarity" if self.retrieved else ""
        lines = [f"{split} split, {examples} examples ({backend}{shots}): accuracy {self.accuracy:.4f}, macro-F1 {self.macro_f1:.4f}",
                 "", f"{'':{width}}precision  recall     f1"]
        for label in self.labels:
            c = self.per_class[label]
            lines.append(f"{label:{width}}{c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:6.4f}")
        lines += ["", "confusion (rows: true, columns: predicted)",
                  f"{'':{width}}" + "".join(f"{label:>{width}}" for label in self.labels)]
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"{label:{width}}" + "".join(f"{n:>{width}}" for n in row))
        if self.random_shots is not None:
            random = self.random_shots
            lines += ["", f"random shots ({random.shots} of each class, drawn with the seed): accuracy "
                          f"{random.accuracy:.4f}, macro-F1 {random.macro_f1:.4f}"]
        if self.shots_note:
            lines += ["", f"note: {self.shots_note}."]
        return lines


@dataclass(frozen=True)
class PerplexityReport:
    """The mean cross-entropy per target token (`loss`) and its exponential (`perplexity`); a mixture's
    sources each have their own beside the whole's.

    Example:
        >>> report = PerplexityReport.of(total=6.0, tokens=3)
        >>> round(report.perplexity, 4), report.logged()["val_loss"]
        (7.3891, 2.0)
    """

    loss: float
    perplexity: float
    tokens: int
    sources: dict[str, "PerplexityReport"] = field(default_factory=dict)

    @classmethod
    def of(cls, total: float, tokens: int, sources: dict[str, "PerplexityReport"] | None = None) -> "PerplexityReport":
        """The report of a summed loss over `tokens` target tokens."""
        return cls(total / tokens, math.exp(total / tokens), tokens, dict(sources or {}))

    def logged(self) -> dict:
        """The whole's loss and perplexity, and each source's (`val_loss/NAME`)."""
        per_source = {f"val_{key}/{name}": getattr(figures, key) for name, figures in self.sources.items()
                      for key in ("loss", "perplexity")}
        return {"val_loss": self.loss, "val_perplexity": self.perplexity, **per_source}

    def summary_fields(self) -> dict:
        return {}

    def to_dict(self, predictions: bool = True) -> dict:
        values = {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}
        if self.sources:
            values["sources"] = {name: figures.to_dict() for name, figures in self.sources.items()}
        return values

    def lines(self, split: str, examples: int, backend: str) -> list[str]:
        return ([f"{split} split, {examples} rows, {self.tokens} target tokens ({backend}): loss {self.loss:.4f}, "
                 f"perplexity {self.perplexity:.3f}"] +
                [f"  {name}: {figures.tokens} target tokens, loss {figures.loss:.4f}, "
                 f"perplexity {figures.perplexity:.3f}" for name, figures in self.sources.items()])


@dataclass(frozen=True)
class PreferenceReport:
    """A preference task's loss and figures over a split's examples (pairs; KTO's rows), with TRL's
    names: rewards/chosen, rewards/accuracies, ...; a reward model's accuracy and margin.

    Example:
        >>> PreferenceReport({"loss": 0.3, "rewards/accuracies": 0.75}, 4).logged()
        {'val_loss': 0.3, 'val_rewards/accuracies': 0.75}
    """

    figures: dict[str, float]
    examples: int
    unit: str = "pairs"

    @property
    def loss(self) -> float:
        return self.figures["loss"]

    def logged(self) -> dict:
        return {f"val_{name}": value for name, value in self.figures.items()}

    def summary_fields(self) -> dict:
        return {}

    def to_dict(self, predictions: bool = True) -> dict:
        return {**self.figures, self.unit: self.examples}

    def lines(self, split: str, examples: int, backend: str) -> list[str]:
        width = max(len(name) for name in self.figures) + 2
        return ([f"{split} split, {self.examples} {self.unit} ({backend}):"] +
                [f"  {name:{width}}{value: .6f}" for name, value in self.figures.items()])


Report = ClassificationReport | PerplexityReport | PreferenceReport
