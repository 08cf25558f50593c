"""Few-shot prompts: k labelled training sentences per class, drawn with the seed (or retrieved:
the k of each class nearest to the sentence, ShotIndex), written before each sentence in the
recipe's own template and verbalizer (in-context learning, no training).

Example:
    >>> from twintune.data.batching import Prompt
    >>> from twintune.data.examples import Example
    >>> prompt = Prompt("Sentence: {text}\\nSentiment:", {"negative": " negative", "positive": " positive"})
    >>> train = [Example("Sales fell .", "negative"), Example("Sales rose .", "positive")]
    >>> with_shots(prompt, draw_shots(train, 1, prompt.labels, seed=0)).render("Costs fell .")
    'Sentence: Sales fell .\\nSentiment: negative\\n\\nSentence: Sales rose .\\nSentiment: positive\\n\\nSentence: Costs fell .\\nSentiment:'
"""

from __future__ import annotations

import numpy as np

from twintune.data.batching import Prompt
from twintune.data.examples import Example
from twintune.errors import TwintuneError

SHOTS_STREAM = 2**31 - 5  # default_rng([seed, SHOTS_STREAM]): apart from the batch orders, default_rng([seed, epoch])
SEPARATOR = "\n\n"  # between demonstrations, and before the sentence


def draw_shots(train: list[Example], k: int, labels: list[str], seed: int) -> list[Example]:
    """k training sentences of each class, drawn without replacement with the seed, in a seeded
    order (classes interleaved as the draw falls, not grouped)."""
    rng = np.random.default_rng([seed, SHOTS_STREAM])
    by_class = {label: [e for e in train if e.label == label] for label in labels}
    check_enough(by_class, k)
    shots = [by_class[label][i] for label in labels for i in sorted(rng.choice(len(by_class[label]), k, replace=False))]
    return [shots[i] for i in rng.permutation(len(shots))]


def check_enough(by_class: dict[str, list], k: int) -> None:
    smallest = min(by_class, key=lambda label: len(by_class[label]))
    if k > len(by_class[smallest]):
        raise TwintuneError(f"--shots {k} asks for {k} examples of each class, but the training split has only "
                            f"{len(by_class[smallest])} of class '{smallest}'.")


class ShotIndex:
    """The training sentences' features (the frozen model's, train/features.py), made unit length once:
    `nearest` gives the k of each class most similar to a sentence's features by cosine similarity
    (the "indexing" way to choose demonstrations, as in KATE, Liu et al. 2022).

    k of each class, like random shots, so the two differ only in which sentences are shown. They
    are ordered least similar first, so the nearest demonstration sits right before the sentence.

    Example:
        >>> train = [Example("Sales fell .", "negative"), Example("Sales rose .", "positive"), Example("Costs rose .", "negative")]
        >>> index = ShotIndex(train, np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), ["negative", "positive"])
        >>> [e.text for e in index.nearest(np.array([0.5, 1.0]), 1)]
        ['Sales rose .', 'Costs rose .']
    """

    def __init__(self, train: list[Example], features: np.ndarray, labels: list[str]):
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        self.unit = features / np.where(norms > 0, norms, 1.0)
        self.train = train
        self.by_class = {label: np.array([i for i, e in enumerate(train) if e.label == label], np.int64) for label in labels}

    def nearest(self, query: np.ndarray, k: int, exclude: int | None = None) -> list[Example]:
        """The k training sentences of each class nearest to `query` (never the training sentence
        `exclude`: a sentence of the train split is not its own demonstration)."""
        check_enough({label: [i for i in idx if i != exclude] for label, idx in self.by_class.items()}, k)
        similarity = self.unit @ (query / max(float(np.linalg.norm(query)), 1e-30))
        if exclude is not None:
            similarity[exclude] = -np.inf
        chosen = np.concatenate([idx[np.argsort(-similarity[idx], kind="stable")[:k]] for idx in self.by_class.values()])
        return [self.train[i] for i in chosen[np.argsort(similarity[chosen], kind="stable")]]


def with_shots(prompt: Prompt, shots: list[Example]) -> Prompt:
    """The prompt with the demonstrations (template + label word each) before its template."""
    demonstrations = "".join(prompt.render(shot.text) + prompt.label_words[shot.label] + SEPARATOR for shot in shots)
    escaped = demonstrations.replace("{", "{{").replace("}", "}}")  # a sentence's braces stay literal
    return Prompt(escaped + prompt.template, prompt.label_words)
