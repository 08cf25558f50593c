"""Evaluation: a task's report on a split (accuracy, macro-F1, per class and the confusion matrix for
classification; loss and perplexity for generative tasks), few-shot evaluation, and what a run logs
of a report.
"""

from __future__ import annotations

import math

import numpy as np

from twintune.data.batching import Encoded, Encoder, eval_batches
from twintune.data.shots import ShotIndex, draw_shots, with_shots
from twintune.errors import TwintuneError
from twintune.train.build import Run
from twintune.train.distributed import mine
from twintune.train.features import compute_features, split_features
from twintune.train.metrics import classification_report


def predict(run: Run, encoded: list[Encoded], features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and label-word log-probabilities (N, K) for encoded examples, in their order
    (a features run: its classifier's log-probabilities, on `features` when given)."""
    if run.classifier is not None:
        if features is None:
            features = compute_features(run, encoded, run.classifier.pooling, run.classifier.layer)
        scores = run.classifier.log_probabilities(features)
        return scores.argmax(axis=1), scores
    scores = np.zeros((len(encoded), len(run.encoder.first_label_ids)), np.float32)
    with run.backend.whole_model():  # this process's batches, however many
        for batch in mine(eval_batches(encoded, run.recipe.train.eval_batch_size), run.world):
            scores[batch.example_index] = run.backend.label_logprobs(batch, run.encoder.first_label_ids)
    if run.world.size > 1:  # each process filled its batches' rows; the rest are zeros
        scores = run.backend.all_sum(scores).astype(np.float32)
    return scores.argmax(axis=1), scores


def evaluate(run: Run, split: str = "validation") -> dict:
    """Accuracy, macro-F1, per-class precision/recall and confusion matrix on a split.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch")
        >>> len(evaluate(run, "validation")["confusion"])   # rows: true class, columns: predicted
        3
    """
    encoded = run.splits[split]
    if not encoded:
        raise TwintuneError(f"the {split} split is empty.")
    if run.recipe.task.generative:
        report = perplexity_report(run, encoded)
        if run.sources:  # a mixture: each source's own figures beside the whole's
            report["sources"] = {name: perplexity_report(run, parts[split]) for name, parts in run.sources.items()
                                 if parts[split]}
        return report
    if run.classifier is not None:  # a features run reads the split's cached features
        return _report(run, encoded, split_features(run, split, run.classifier.pooling, run.classifier.layer))
    return _report(run, encoded)


def evaluate_with_shots(run: Run, split: str, shots: int, retrieve: bool = False) -> dict:
    """`evaluate` with `shots` training sentences of each class before every sentence (in-context
    learning: data/shots.py), drawn with the recipe's seed, or with `retrieve` the ones nearest to
    each sentence by the model's own features (the features task's cache: RETRIEVAL_POOLING pooled
    final hidden states, cosine similarity); a retrieved report carries the random shots' accuracy
    beside its own. Where the shots do not fit the model's context with the split's longest
    sentence, as many as fit, with a note; none fitting is an error.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> evaluate_with_shots(prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch"), "test", 2)["shots"]
        2
    """
    if shots < 0:
        raise TwintuneError(f"--shots must be 0 or more, got {shots}.")
    if run.recipe.task.generative:
        raise TwintuneError(f"--shots puts labelled sentences before each sentence; a {run.recipe.task.name} run has "
                            "no labels (evaluate its perplexity without --shots).")
    if run.classifier is not None:
        raise TwintuneError("--shots puts labelled sentences with their label words before each sentence, but this "
                            "is a features run, whose classifier reads no label words; evaluate it without --shots.")
    if run.encoder.head:
        raise TwintuneError("--shots puts labelled sentences with their label words before each sentence, but this "
                            "run classifies with a linear head, which reads no label words; evaluate it without --shots.")
    if shots == 0:
        if retrieve:
            raise TwintuneError("--retrieve chooses the --shots sentences; give --shots 1 or more.")
        return {**evaluate(run, split), "shots": 0, "shots_asked": 0, "shots_note": None}
    labels, seed = run.encoder.prompt.labels, run.recipe.seed
    report = _shots_report(run, split, shots, lambda used: [draw_shots(run.examples["train"], used, labels, seed)]
                           * len(run.examples[split]))
    if not retrieve:
        return report
    index = ShotIndex(run.examples["train"], split_features(run, "train", RETRIEVAL_POOLING), labels)
    queries = split_features(run, split, RETRIEVAL_POOLING)
    own = split == "train"  # a training sentence is not its own demonstration
    retrieved = _shots_report(run, split, shots, lambda used: [index.nearest(q, used, i if own else None)
                                                               for i, q in enumerate(queries)])
    return {**retrieved, "retrieved": True,
            "random_shots": {key: report[key] for key in ("accuracy", "macro_f1", "shots", "predictions")}}


RETRIEVAL_POOLING = "mean"  # the pooling whose classifier reads the demo best (0.70, against 0.56 for last)


def _shots_report(run: Run, split: str, shots: int, choose) -> dict:
    """The report with the most shots up to `shots` that fit the context; `choose(k)` gives each
    sentence's demonstrations (k of each class)."""
    encoder, context = run.encoder, run.encoder.context
    for used in range(shots, 0, -1):
        chosen = choose(used)  # outside the try: too few sentences of a class is the user's error
        try:
            encoded = [Encoder(encoder.tokenizer, with_shots(encoder.prompt, demonstrations), max_length=context,
                               method=run.method, context=context).encode(e.text, e.label, f" #{i} of the {split} split")
                       for i, (e, demonstrations) in enumerate(zip(run.examples[split], chosen))]
        except TwintuneError:  # too long for the context: one shot of each class fewer
            continue
        note = None if used == shots else (f"{shots} shots of each class do not fit the model's {context} positions "
                                           f"with the {split} split's longest sentence; {used} do")
        return {**_report(run, encoded), "shots": used, "shots_asked": shots, "shots_note": note}
    raise TwintuneError(f"not even one shot of each class fits the model's {context} positions with the {split} "
                        "split's longest sentence; use --shots 0 or shorter sentences.")


def perplexity_report(run: Run, encoded: list[Encoded]) -> dict:
    """The mean cross-entropy per target token and its exponential, the perplexity."""
    total, tokens = 0.0, 0
    with run.backend.whole_model():
        for batch in mine(eval_batches(encoded, run.recipe.train.eval_batch_size), run.world):
            total += run.backend.target_loss(batch)
            tokens += batch.n_targets
    if run.world.size > 1:
        total, tokens = run.backend.all_sum(np.array([total, tokens], np.float64)).tolist()
        tokens = round(tokens)
    return {"loss": total / tokens, "perplexity": math.exp(total / tokens), "tokens": tokens}


def _report(run: Run, encoded: list[Encoded], features: np.ndarray | None = None) -> dict:
    predictions, _ = predict(run, encoded, features)
    labels = np.array([e.label for e in encoded])
    report = classification_report(labels, predictions, run.encoder.prompt.labels)
    report["predictions"] = predictions.tolist()
    return report


def perplexity_of(run: Run, rows: list[Encoded]) -> float:
    """The model's perplexity on rows (every target token alike)."""
    return perplexity_report(run, rows)["perplexity"]


def better(metric: str, value: float, best: float) -> bool:
    """Whether an evaluation improves on the best: accuracy and F1 up, loss and perplexity down."""
    return value < best if metric in ("val_loss", "val_perplexity") else value > best
