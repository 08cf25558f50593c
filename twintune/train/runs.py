"""Finished runs reopened: evaluate them on a split, or predict labels for new texts.

A target is a run directory (recipe.json + adapter/, as `twintune train` writes) or a recipe
file (the base model with the recipe's method at its initial values, i.e. before training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.formats.adapter import load_lora_adapter
from twintune.recipe import load_recipe
from twintune.train.loop import Run, evaluate, predict, prepare


def open_run(target: str | Path, backend: str | None = None, with_data: bool = True) -> Run:
    """A prepared run with a run directory's trained adapter loaded (or a recipe's initial values).

    Example:
        >>> run = open_run("runs/demo", backend="mlx")
        >>> evaluate(run, "test")["accuracy"]
    """
    path = Path(target)
    if not path.exists():
        raise TwintuneError(f"{path} does not exist; give a run directory (from twintune train) or a recipe file.")
    if not path.is_dir():
        return prepare(load_recipe(path), backend, with_data)
    if not (path / "recipe.json").exists():
        raise TwintuneError(f"{path} is not a run directory: it has no recipe.json.")
    run = prepare(load_recipe(path / "recipe.json"), backend, with_data)
    _, state = load_lora_adapter(path / "adapter", run.spec)
    expected = run.backend.trainable_state()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise TwintuneError(f"the adapter in {path / 'adapter'} does not fit the run's recipe "
                            "(different target modules or rank).")
    run.backend.set_trainable_state(state)
    return run


def evaluate_target(target: str | Path, split: str = "validation", backend: str | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix on a split.

    Example:
        >>> evaluate_target("runs/demo", "test")["macro_f1"]
    """
    if split not in ("train", "validation", "test"):
        raise TwintuneError(f"split must be train, validation or test, got {split!r}.")
    run = open_run(target, backend)
    if not run.splits.get(split):
        raise TwintuneError(f"the {split} split is empty; set data.{split}_fraction in the recipe.")
    report = evaluate(run, split)
    report.pop("predictions")
    report.update(split=split, examples=len(run.splits[split]), backend=run.backend.name)
    return report


def predict_texts(target: str | Path, texts: list[str], backend: str | None = None) -> list[dict]:
    """Label and class probabilities for each text (softmax over the label words' scores).

    Example:
        >>> predict_texts("runs/demo", ["Operating profit rose to EUR 13.1 mn ."])[0]["label"]
        'positive'
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TwintuneError("give at least one non-empty text to predict.")
    run = open_run(target, backend, with_data=False)
    labels = run.encoder.prompt.labels
    encoded = [run.encoder.encode(text, labels[0], f" (text {i + 1})") for i, text in enumerate(texts)]
    predicted, scores = predict(run, encoded)
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return [{"text": text, "label": labels[k], "probabilities": dict(zip(labels, map(float, p)))}
            for text, k, p in zip(texts, predicted, probabilities)]


def format_report(report: dict) -> str:
    """A readable table of an evaluation report."""
    labels = report["labels"]
    width = max(len(label) for label in labels) + 2
    lines = [f"{report['split']} split, {report['examples']} examples ({report['backend']}): "
             f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}", "",
             f"{'':{width}}precision  recall     f1"]
    for label in labels:
        c = report["per_class"][label]
        lines.append(f"{label:{width}}{c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:6.4f}")
    lines += ["", "confusion (rows: true, columns: predicted)", f"{'':{width}}" + "".join(f"{l:>{width}}" for l in labels)]
    for label, row in zip(labels, report["confusion"]):
        lines.append(f"{label:{width}}" + "".join(f"{n:>{width}}" for n in row))
    return "\n".join(lines)

