"""Few-shot prompts: k labelled training sentences per class, drawn with the seed, written before
each sentence in the recipe's own template and verbalizer (in-context learning, no training).

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
    smallest = min(by_class, key=lambda label: len(by_class[label]))
    if k > len(by_class[smallest]):
        raise TwintuneError(f"--shots {k} asks for {k} examples of each class, but the training split has only "
                            f"{len(by_class[smallest])} of class '{smallest}'.")
    shots = [by_class[label][i] for label in labels for i in sorted(rng.choice(len(by_class[label]), k, replace=False))]
    return [shots[i] for i in rng.permutation(len(shots))]


def with_shots(prompt: Prompt, shots: list[Example]) -> Prompt:
    """The prompt with the demonstrations (template + label word each) before its template."""
    demonstrations = "".join(prompt.render(shot.text) + prompt.label_words[shot.label] + SEPARATOR for shot in shots)
    escaped = demonstrations.replace("{", "{{").replace("}", "}}")  # a sentence's braces stay literal
    return Prompt(escaped + prompt.template, prompt.label_words)
