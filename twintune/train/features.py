"""Feature-based classification: a frozen model's sentence features, computed once per split and
cached on disk, and a logistic-regression classifier trained on them (numpy; no gradient flows
into the model).

Example:
    >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch")
    >>> train = split_features(run, "train", "last")          # computed, then cached
    >>> classifier = LogisticRegression.fit(train, labels_of(run, "train"))
    >>> (classifier.predict(split_features(run, "test", "last")) == labels_of(run, "test")).mean()
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twintune.data.batching import eval_batches
from twintune.formats.safetensors_io import read_safetensors, write_safetensors

CACHE_ENV = "TWINTUNE_CACHE"  # where cached features live; default ~/.cache/twintune
FEATURE_BATCH = 16


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "twintune") / "features"


def features_key(run, split: str, pooling: str) -> str:
    """What the features depend on: the model's files (names, sizes, modification times), the
    method's trainable values, the split's token ids (data, template and tokenizer in one), the
    pooling and the dtype. Any change gives another key, so a stale file is never read."""
    digest = hashlib.sha256()
    for path in sorted(Path(run.model_dir).iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    for name, value in sorted(run.backend.trainable_state().items()):
        digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
    for example in run.splits[split]:
        digest.update(np.asarray(example.ids[: example.prompt_len], np.int64).tobytes() + b";")
    digest.update(f"{pooling};{run.recipe.dtype}".encode())
    return digest.hexdigest()[:32]


def split_features(run, split: str, pooling: str) -> np.ndarray:
    """(N, d) features of a split's sentences in split order, from the cache where it holds them.
    A cache file that cannot be read is recomputed, with a warning, and never trusted."""
    path = cache_dir() / f"{features_key(run, split, pooling)}.safetensors"
    if path.exists():
        try:
            cached = read_safetensors(path)["features"]
            if cached.shape[0] == len(run.splits[split]):
                return cached
            raise ValueError(f"{cached.shape[0]} rows for {len(run.splits[split])} sentences")
        except Exception as error:  # noqa: BLE001 - any unreadable cache file is recomputed
            warnings.warn(f"the cached features {path} are unreadable ({error}); computing them again.",
                          stacklevel=2)
    features = compute_features(run, split, pooling)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"features": features})
    return features


def compute_features(run, split: str, pooling: str) -> np.ndarray:
    encoded = run.splits[split]
    features = np.zeros((len(encoded), run.spec.hidden_size), np.float64 if run.recipe.dtype == "float64"
                        else np.float32)
    for batch in eval_batches(encoded, FEATURE_BATCH):
        features[batch.example_index] = run.backend.features(batch, pooling)
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
        x = features.astype(np.float64)
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-8
        x = (x - mean) / scale
        k = classes or int(labels.max()) + 1
        onehot = np.eye(k)[labels]
        weight, bias = np.zeros((x.shape[1], k)), np.zeros(k)
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
