"""Feature-based classification: a frozen model's sentence features, computed once per split and
cached on disk, and a logistic-regression classifier trained on them (numpy; no gradient flows
into the model).

Example:
    >>> from twintune.recipe import load_recipe
    >>> from twintune.train.build import prepare
    >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch")
    >>> train = split_features(run, "train", "last")          # computed, then cached
    >>> classifier = LogisticRegression.fit(train, labels_of(run, "train"))
    >>> accuracy = (classifier.predict(split_features(run, "test", "last")) == labels_of(run, "test")).mean()
    >>> bool(accuracy > 0.4)   # chance is 1/3
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twintune.data.batching import eval_batches
from twintune.errors import TwintuneError, TwintuneWarning
from twintune.formats.safetensors_io import read_safetensors, write_safetensors
from twintune.tasks import ClassificationReport, check_head_labels

CACHE_ENV = "TWINTUNE_CACHE"  # where cached features live; default ~/.cache/twintune
FEATURE_BATCH = 16


def cache_root() -> Path:
    """Where twintune caches what it computes once (features, reference log-probabilities)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "twintune")


def cache_dir() -> Path:
    return cache_root() / "features"


def hash_model_files(digest, directory: Path) -> None:
    """Add a model directory's files (names, sizes, modification times) to a hashlib digest."""
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())


def features_key(run, split: str, pooling: str, layer: int | None = None) -> str:
    """What the features depend on: the model's files (names, sizes, modification times), the
    method's trainable values, the split's token ids (data, template and tokenizer in one), the
    pooling, the layer and the dtype. Any change gives another key, so a stale file is never read."""
    digest = hashlib.sha256()
    hash_model_files(digest, run.model_dir)
    for name, value in sorted(run.backend.trainable_state().items()):
        digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
    for example in run.splits[split]:
        digest.update(np.asarray(example.ids[: example.prompt_len], np.int64).tobytes() + b";")
    digest.update(f"{pooling};{'final' if layer is None else layer};{run.recipe.dtype}".encode())
    return digest.hexdigest()[:32]


def features_path(run, split: str, pooling: str, layer: int | None = None) -> Path:
    return cache_dir() / f"{features_key(run, split, pooling, layer)}.safetensors"


def split_features(run, split: str, pooling: str, layer: int | None = None) -> np.ndarray:
    """(N, d) features of a split's sentences in split order, from the cache where it holds them.
    A cache file that cannot be read is recomputed, with a warning, and never trusted. `layer`:
    the hidden states after that many blocks (None: the final, normed ones)."""
    path = features_path(run, split, pooling, layer)
    if path.exists():
        try:
            cached = read_safetensors(path)["features"]
            if cached.shape[0] == len(run.splits[split]):
                return cached
            raise ValueError(f"{cached.shape[0]} rows for {len(run.splits[split])} sentences")
        except Exception as error:  # noqa: BLE001 - any unreadable cache file is recomputed
            warnings.warn(f"the cached features {path} are unreadable ({error}); computing them again.",
                          TwintuneWarning, stacklevel=2)
    features = compute_features(run, run.splits[split], pooling, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"features": features})
    return features


def compute_features(run, encoded: list, pooling: str, layer: int | None = None) -> np.ndarray:
    """(N, d) features of encoded examples, in their order (no cache)."""
    features = np.zeros((len(encoded), run.spec.hidden_size), np.float64 if run.recipe.dtype == "float64"
                        else np.float32)
    for batch in eval_batches(encoded, FEATURE_BATCH):
        features[batch.example_index] = run.backend.features(batch, pooling, layer)
    return features


def labels_of(run, split: str) -> np.ndarray:
    return np.array([e.label for e in run.splits[split]], np.int64)


@dataclass
class LogisticRegression:
    """Multinomial logistic regression on standardized features, L2-regularized, fitted by full-batch
    gradient descent with a fixed step count: deterministic, and the same on any machine.

    Example:
        >>> x = np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]])
        >>> LogisticRegression.fit(x, np.array([0, 1, 0, 1]), classes=2).predict(x).tolist()
        [0, 1, 0, 1]
    """

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (d, K)
    bias: np.ndarray  # (K,)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, classes: int | None = None, l2: float = 1e-3,
            steps: int = 500, lr: float = 0.5) -> "LogisticRegression":
        from threadpoolctl import threadpool_limits

        x = features.astype(np.float64)
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-8
        x = (x - mean) / scale
        k = classes or int(labels.max()) + 1
        onehot = np.eye(k)[labels]
        weight, bias = np.zeros((x.shape[1], k)), np.zeros(k)
        # One BLAS thread: the products are skinny ((N, d) by (d, K)), and threads that wait for a busy
        # core made the fit 3-8 s instead of 0.2-1.3 s (benchmarks/README.md, "Classification head and
        # features"); the sums then also do not depend on the machine's thread count.
        with threadpool_limits(limits=1, user_api="blas"):
            for _ in range(steps):
                probabilities = _softmax(x @ weight + bias)
                error = (probabilities - onehot) / len(x)
                weight -= lr * (x.T @ error + l2 * weight)
                bias -= lr * error.sum(axis=0)
        return cls(mean, scale, weight, bias)

    def scores(self, features: np.ndarray) -> np.ndarray:
        return ((features.astype(np.float64) - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features).argmax(axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- the features task: a run that fits the classifier, and its saved result -------------------------

CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier_config.json"


@dataclass
class FeatureClassifier:
    """A features run's result: the logistic regression, the features it reads, and its labels."""

    model: LogisticRegression
    pooling: str
    layer: int | None  # the hidden states after that many blocks; None: the final, normed ones
    labels: list[str]

    def log_probabilities(self, features: np.ndarray) -> np.ndarray:
        scores = self.model.scores(features)
        scores = scores - scores.max(axis=1, keepdims=True)
        return (scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))).astype(np.float32)

    @property
    def parameters(self) -> int:
        return int(self.model.weight.size + self.model.bias.size)


def save_classifier(directory: Path, classifier: FeatureClassifier) -> None:
    """classifier.safetensors (mean, scale, weight, bias) and classifier_config.json (labels, pooling, layer)."""
    from twintune.formats.adapter import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    m = classifier.model
    write_safetensors(directory / CLASSIFIER_FILE, {"mean": m.mean, "scale": m.scale, "weight": m.weight,
                                                    "bias": m.bias})
    write_json(directory / CLASSIFIER_CONFIG, {"labels": classifier.labels, "pooling": classifier.pooling,
                                               "layer": classifier.layer})


def load_classifier(directory: Path, labels, hidden_size: int) -> FeatureClassifier:
    """A features run's classifier, checked: whole files, the model's width, the labels given."""

    directory = Path(directory)
    try:
        config = json.loads((directory / CLASSIFIER_CONFIG).read_text())
        arrays = read_safetensors(directory / CLASSIFIER_FILE)
        model = LogisticRegression(*(np.asarray(arrays[k], np.float64) for k in ("mean", "scale", "weight", "bias")))
        saved = list(config["labels"])
        classifier = FeatureClassifier(model, config["pooling"], config["layer"], saved)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TwintuneError(f"the classifier in {directory} cannot be read ({type(error).__name__}: {error}); "
                            "train the features run again.") from None
    except TwintuneError as error:
        raise TwintuneError(f"the classifier in {directory} cannot be read ({error}).") from None
    if model.weight.shape[0] != hidden_size or model.mean.shape != (hidden_size,):
        raise TwintuneError(f"the classifier in {directory} reads {model.weight.shape[0]} features, but this model "
                            f"gives {hidden_size}; was it fitted on another base model?")
    check_head_labels(model.weight.T, saved, list(labels), directory)
    return classifier


def train_features(run, out: Path) -> dict:
    """The features task: the train and validation splits' features (cached), the classifier fitted on
    the train split's, saved in out/classifier, and its validation report. Returns the summary."""
    task = run.recipe.task
    index = task.check_layer(run.spec.num_layers)
    layer = None if index == run.spec.num_layers else index
    started = time.perf_counter()
    cached = {split: features_path(run, split, task.pooling, layer).exists() for split in ("train", "validation")}
    features = {split: split_features(run, split, task.pooling, layer) for split in ("train", "validation")}
    extracted = time.perf_counter()
    labels = list(run.encoder.prompt.labels)
    model = LogisticRegression.fit(features["train"], labels_of(run, "train"), classes=len(labels), l2=task.l2)
    run.classifier = FeatureClassifier(model, task.pooling, layer, labels)
    fitted = time.perf_counter()
    save_classifier(out / "classifier", run.classifier)
    report = ClassificationReport.of(labels_of(run, "validation"), model.predict(features["validation"]), labels)
    tokens = sum(e.prompt_len for split in ("train", "validation") for e in run.splits[split])
    return {
        "feature_seconds": extracted - started, "fit_seconds": fitted - extracted,
        "train_seconds": fitted - started, "features_cached": cached, "layer": index,
        "trainable_params": run.classifier.parameters, "real_tokens": tokens,
        "real_tokens_per_second": tokens / (extracted - started) if not all(cached.values()) else None,
        **report.logged(), **report.summary_fields(),
    }
