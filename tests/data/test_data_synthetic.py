"""The synthetic financial-sentiment set: deterministic, balanced, and not solvable by keywords."""

import collections

import numpy as np

from twintune.data.sources import Example, naive_bayes_unigram_accuracy
from twintune.data.synthetic import SYNTHETIC_LABELS, corpus_text, synthetic_financial_sentiment


def _bigram_naive_bayes_accuracy(train: list[Example], test: list[Example]) -> float:
    """Multinomial naive Bayes on adjacent word pairs (Laplace smoothing)."""

    def bigrams(text: str) -> list[str]:
        words = text.lower().split()
        return [f"{a} {b}" for a, b in zip(words, words[1:])]

    classes = sorted({example.label for example in train})
    counts = {label: collections.Counter() for label in classes}
    priors = collections.Counter(example.label for example in train)
    for example in train:
        counts[example.label].update(bigrams(example.text))
    vocabulary = set().union(*counts.values())
    totals = {label: sum(counts[label].values()) for label in classes}

    correct = 0
    for example in test:
        features = [f for f in bigrams(example.text) if f in vocabulary]
        scores = {
            label: np.log(priors[label])
            + sum(np.log((counts[label][f] + 1) / (totals[label] + len(vocabulary))) for f in features)
            for label in classes
        }
        correct += max(scores, key=scores.get) == example.label
    return correct / len(test)


def test_synthetic_is_deterministic_per_seed():
    assert synthetic_financial_sentiment(200, seed=3) == synthetic_financial_sentiment(200, seed=3)
    assert synthetic_financial_sentiment(200, seed=3) != synthetic_financial_sentiment(200, seed=4)


def test_synthetic_has_exact_size_and_balanced_classes():
    for n in (1, 2, 100, 1501):
        data = synthetic_financial_sentiment(n, seed=0)
        assert len(data) == n
        counts = collections.Counter(example.label for example in data)
        assert set(counts) <= set(SYNTHETIC_LABELS)
        full = [counts.get(label, 0) for label in SYNTHETIC_LABELS]
        assert max(full) - min(full) <= 1


def test_synthetic_sentences_are_short_ascii_and_varied():
    data = synthetic_financial_sentiment(1500, seed=0)
    lengths = [len(example.text.split()) for example in data]
    assert min(lengths) >= 8 and max(lengths) <= 32
    assert all(example.text.isascii() for example in data)
    assert len({example.text for example in data}) > 0.99 * len(data)
    companies = {example.text.split(" ")[0] for example in data}
    assert len(companies) > 20


def test_metric_words_occur_in_both_polar_classes_and_directions_flip_with_them():
    data = synthetic_financial_sentiment(6000, seed=0)  # bad metrics are a 5% minority of polar pairs
    for word in ("profit", "sales", "costs", "losses", "margin"):
        counts = collections.Counter(e.label for e in data if word in e.text.lower().split())
        polar = counts["positive"] + counts["negative"]
        assert polar > 10, word
        assert 0.3 < counts["positive"] / polar < 0.7, (word, counts)
    # "rose" is mostly positive, but negative with bad metrics: an interaction to learn.
    rose = [e for e in data if "rose" in e.text.split()]
    assert {e.label for e in rose if "costs" in e.text.split()} == {"negative"}
    assert collections.Counter(e.label for e in rose)["negative"] > 5


def _best_single_keyword_accuracy(data: list[Example]) -> float:
    """The best rule of the form 'word present -> class A, else class B' over every word."""
    n = len(data)
    labels = sorted({e.label for e in data})
    present = collections.defaultdict(collections.Counter)
    totals = collections.Counter(e.label for e in data)
    for e in data:
        for word in set(e.text.lower().split()):
            present[word][e.label] += 1
    best = 0.0
    for counts in present.values():
        for a in labels:
            for b in labels:
                best = max(best, (counts[a] + totals[b] - counts[b]) / n)
    return best


def test_no_single_keyword_decides_but_words_together_do():
    data = synthetic_financial_sentiment(1500, seed=0)
    assert _best_single_keyword_accuracy(data) < 0.6
    train, test = data[:1200], data[1200:]
    unigram = naive_bayes_unigram_accuracy(train, test)
    bigram = _bigram_naive_bayes_accuracy(train, test)
    assert unigram >= 0.80, unigram  # many words together are informative
    assert bigram >= 0.85, bigram


def test_corpus_text_is_a_few_thousand_varied_sentences():
    lines = corpus_text(seed=0)
    assert 2000 <= len(lines) <= 10000
    assert all(isinstance(line, str) and line for line in lines)
    assert len(set(lines)) > 0.99 * len(lines)
    assert corpus_text(seed=0) == lines
