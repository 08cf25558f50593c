"""Evaluation: a task's report on a split (accuracy, macro-F1, per class and the confusion matrix for
classification; loss and perplexity for generative tasks), few-shot evaluation, and what a run logs
of a report.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from twintune.data.batching import Batch, Encoded, Encoder, eval_batches
from twintune.data.shots import ShotIndex, draw_shots, with_shots
from twintune.errors import TwintuneError
from twintune.train.build import Run
from twintune.train.step import RunModel
from twintune.backends.base import Backend
from twintune.train.distributed import ALONE, World, mine
from twintune.train.features import compute_features, split_features
from twintune.tasks import ClassificationReport, PerplexityReport, Report
from twintune.tasks.objectives import NUMPY, with_reference


def predict(run: Run, encoded: list[Encoded], features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and label-word log-probabilities (N, K) for encoded examples, in their order
    (a features run: its classifier's log-probabilities, on `features` when given)."""
    if run.classifier is not None:
        if features is None:
            features = compute_features(run, encoded, run.classifier.pooling, run.classifier.layer)
        scores = run.classifier.log_probabilities(features)
        return scores.argmax(axis=1), scores
    scores = label_scores(run.backend, encoded, run.encoder.first_label_ids, run.recipe.train.eval_batch_size, run.world)
    return scores.argmax(axis=1), scores


def label_scores(backend: Backend, encoded: list[Encoded], label_ids: list[int], batch_size: int,
                 world: World = ALONE) -> np.ndarray:
    """The label words' (or a head's classes') log-probabilities (N, K) for encoded examples, in their
    order: what a run's evaluation and prediction and `Model.predict` all read."""
    scores = np.zeros((len(encoded), len(label_ids)), np.float32)
    with backend.whole_model():  # this process's batches, however many
        for batch in mine(eval_batches(encoded, batch_size), world):
            scores[batch.example_index] = backend.label_logprobs(batch, label_ids)
    if world.size > 1:  # each process filled its batches' rows; the rest are zeros
        scores = backend.all_sum(scores).astype(np.float32)
    return scores


def labelled_texts(texts: list[str], scores: np.ndarray, labels: list[str]) -> list[dict]:
    """Each text with its predicted label and the softmax of its scores over the labels.

    Example:
        >>> labelled_texts(["up"], np.log(np.array([[0.2, 0.8]])), ["down", "up"])[0]["label"]
        'up'
    """
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return [{"text": text, "label": labels[k], "probabilities": dict(zip(labels, map(float, p)))}
            for text, k, p in zip(texts, scores.argmax(axis=1), probabilities)]


class RunScorer:
    """What a task's evaluation asks of a run (tasks/task.py Scorer): a split's rows, its class scores
    (a features run's from its cached features), the loss of rows' target tokens."""

    def __init__(self, run: Run):
        self.run, self.labels = run, list(run.encoder.prompt.labels)

    def rows(self, split: str) -> list[Encoded]:
        return self.run.splits[split]

    def sources(self, split: str) -> dict[str, list[Encoded]]:
        return {name: parts[split] for name, parts in self.run.sources.items()}

    def class_scores(self, split: str) -> np.ndarray:
        run, features = self.run, None
        if run.classifier is not None:  # a features run reads the split's cached features
            features = split_features(run, split, run.classifier.pooling, run.classifier.layer)
        return predict(run, run.splits[split], features)[1]

    def token_loss(self, rows: list[Encoded]) -> tuple[float, int]:
        total, tokens = 0.0, 0
        run = self.run
        with run.backend.whole_model():
            for batch in mine(eval_batches(rows, run.recipe.train.eval_batch_size), run.world):
                total += run.backend.target_loss(batch)
                tokens += batch.n_targets
        if run.world.size > 1:
            total, tokens = run.backend.all_sum(np.array([total, tokens], np.float64)).tolist()
        return total, round(tokens)

    def objective_sums(self, split: str, objective) -> tuple[np.ndarray, int]:
        run = self.run
        sums, examples = np.zeros(1 + len(objective.figures)), 0
        model = RunModel(run)
        with run.backend.whole_model():
            for batch in mine(eval_batches(run.splits[split], run.recipe.train.eval_batch_size), run.world):
                batch = objective.prepare(batch, model, EVAL_SEED)
                sums += objective_values(run.backend, batch, objective)
                examples += objective.count(batch)
        if run.world.size > 1:
            totals = run.backend.all_sum(np.array([*sums, examples], np.float64))
            sums, examples = totals[:-1], totals[-1]
        return sums, round(examples)


EVAL_SEED = 0  # an objective's sampling in evaluation (GRPO's completions): the same draws at every evaluation


def objective_values(backend: Backend, batch: Batch, objective) -> np.ndarray:
    """An objective's summed loss and figures on a (prepared) batch, computed in numpy (float64) from the
    model's values at its targets (and the reference's, where it needs them)."""
    if objective.needs_reference:
        batch = with_reference(batch, backend.target_values, objective.temperature)
    loss, figures = objective.loss(NUMPY, backend.target_values(batch, objective.reads, temperature=objective.temperature),
                                   batch)
    return np.array([float(loss), *map(float, figures)])


def evaluate(run: Run, split: str = "validation") -> Report:
    """The task's report on a split (tasks/reports.py): accuracy, macro-F1, per-class figures and the
    confusion matrix for a labelled task; loss and perplexity for a generative one.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch")
        >>> len(evaluate(run, "validation").confusion)   # rows: true class, columns: predicted
        3
    """
    if not run.splits[split]:
        raise TwintuneError(f"the {split} split is empty.")
    return run.recipe.task.evaluate(RunScorer(run), split)


def evaluate_with_shots(run: Run, split: str, shots: int, retrieve: bool = False) -> ClassificationReport:
    """`evaluate` with `shots` training sentences of each class before every sentence (in-context
    learning: data/shots.py), drawn with the recipe's seed, or with `retrieve` the ones nearest to
    each sentence by the model's own features (the features task's cache: RETRIEVAL_POOLING pooled
    final hidden states, cosine similarity); a retrieved report carries the random shots' accuracy
    beside its own. Where the shots do not fit the model's context with the split's longest
    sentence, as many as fit, with a note; none fitting is an error.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> evaluate_with_shots(prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch"), "test", 2).shots
        2
    """
    if shots < 0:
        raise TwintuneError(f"--shots must be 0 or more, got {shots}.")
    refusal = run.recipe.task.shots_refusal()
    if refusal:
        raise TwintuneError(f"{refusal}.")
    if shots == 0:
        if retrieve:
            raise TwintuneError("--retrieve chooses the --shots sentences; give --shots 1 or more.")
        return evaluate(run, split).with_shots(0, 0, None)
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
    return dataclasses.replace(retrieved, retrieved=True, random_shots=report)


RETRIEVAL_POOLING = "mean"  # the pooling whose classifier reads the demo best (0.70, against 0.56 for last)


def _shots_report(run: Run, split: str, shots: int, choose) -> ClassificationReport:
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
        return _report(run, encoded).with_shots(used, shots, note)
    raise TwintuneError(f"not even one shot of each class fits the model's {context} positions with the {split} "
                        "split's longest sentence; use --shots 0 or shorter sentences.")


def perplexity_report(run: Run, rows: list[Encoded]) -> PerplexityReport:
    """The mean cross-entropy per target token of rows, and its exponential, the perplexity."""
    return PerplexityReport.of(*RunScorer(run).token_loss(rows))


def _report(run: Run, encoded: list[Encoded], features: np.ndarray | None = None) -> ClassificationReport:
    predictions, _ = predict(run, encoded, features)
    return ClassificationReport.of(np.array([e.label for e in encoded]), predictions, run.encoder.prompt.labels)


def perplexity_of(run: Run, rows: list[Encoded]) -> float:
    """The model's perplexity on rows (every target token alike)."""
    return perplexity_report(run, rows).perplexity


def better(metric: str, value: float, best: float) -> bool:
    """Whether an evaluation improves on the best: accuracy and F1 up, loss and perplexity down."""
    return value < best if metric in ("val_loss", "val_perplexity") else value > best
