"""Guards against forgetting, measured: the perplexity of held-out general text before and after
training (`train.forgetting_eval`), replay of general text in every step (`train.replay`),
distillation to the base model on general text (`train.distill`), and EWC's pull of the trainable
values back to their start (`train.ewc`).

General text is a causal-LM source (a .txt with one document per line, JSONL `text`, a `datasets`
source, or `synthetic`: the synthetic generator's sentences from a stream of their own, like the
text the built-in model was pre-trained on), one document per row followed by end-of-text (cut into
rows of `data.max_length` if longer): the perplexity of each document on its own, as a model reads a
text from its start, not of documents packed behind others.

Replay: each step's task examples are joined by round(B * f / (1 - f)) rows of general text (B the
step's task examples, f `train.replay.fraction`), so that f of the step's examples are general
text; the step's loss is (1 - f) * the task's mean loss per target token + f * the general text's
mean loss per token, each averaged over its own tokens (a 40-token text row would otherwise
outweigh a one-token label word forty times). Which rows a step replays depends on (seed, step)
alone: resume stays exact.

Distillation: each step also takes `rows` rows of general text and adds weight * T^2 * the mean
over their tokens of KL(base || model) at temperature T, the base being the same model with the
method switched off (each backend's `base_view`: wrapped layers give way to their base layers,
slots are emptied, unfrozen parameters take their start's values for the teacher's forward pass).
No second copy of the weights is made, except for methods that train base parameters (BitFit, last
blocks, full fine-tuning), whose start's values are kept: for full fine-tuning, a frozen copy of
the model (`twintune estimate` counts it).

EWC (Kirkpatrick et al., 2017): before training, the diagonal of the empirical Fisher information
on `samples` rows of general text, F = the mean over rows of the squared gradient of each row's mean
loss per token, at the start's values theta0; every step then adds weight * sum(F * (theta -
theta0)^2) to the loss (its gradient, 2 * weight * F * (theta - theta0), to the gradients). It acts
on the trainable values themselves: for LoRA, A and B (whose start is B = 0), not the merged update
B @ A; for full fine-tuning, the weights. Both are recomputed on resume (the start's values and the
general text are the same), so a checkpoint need not hold them.
"""

from __future__ import annotations

import math

import numpy as np

from twintune.backends.base import Backend
from twintune.data.batching import Batch, Encoded, make_batch
from twintune.data.documents import eos_id, lm_rows, load_documents, one_per_row
from twintune.errors import TwintuneError

GENERAL_SEED = 50_000  # `synthetic` general text: a stream apart from the task's, the corpus's and the pre-training's
FORGETTING, REPLAY, EWC, DISTILL = 0, 1, 2, 3  # synthetic general text: each use its own stream of sentences
GENERAL_SYNTHETIC_DOCUMENTS = 400
REPLAY_STREAM = 0x5250  # "RP": the replay rows' permutations, apart from the task's order
DISTILL_STREAM = 0x4453  # "DS": the distillation rows' permutations


def general_rows(source: str, tokenizer, length: int, stream: int = FORGETTING) -> list[Encoded]:
    """General text as packed causal-LM rows (`synthetic`: the stream's own sentences, so that replayed
    text is never the held-out text)."""
    if source == "synthetic":
        from twintune.data.synthetic import synthetic_financial_sentiment

        documents = [e.text for e in synthetic_financial_sentiment(n=GENERAL_SYNTHETIC_DOCUMENTS,
                                                                    seed=GENERAL_SEED + stream)]
    else:
        documents = load_documents(source)
    ids = [tokenizer.encode(text, add_special_tokens=False).ids for text in documents]
    rows = lm_rows(one_per_row(ids, length, eos_id(tokenizer)))
    if not rows:
        raise TwintuneError(f"the general text {source} gives no rows of two tokens or more.")
    return rows


def general_batch(rows: list[Encoded], per_step: int, step: int, seed: int, stream: int, pad_id: int = 0) -> Batch:
    """The general-text rows of `step`: the next `per_step` of the rows' seeded permutations, one per pass."""
    chosen = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, within = divmod(position, len(rows))
        chosen.append(rows[np.random.default_rng([seed, stream, epoch]).permutation(len(rows))[within]])
    return make_batch(chosen, pad_id)


def loss_weights(batches: list[Batch], counts: list[int], fraction: float) -> list[float]:
    """Each micro-batch's factor on its summed loss: 1 / the task's count (its target tokens, or an
    objective's examples), or with replay (1 - f) / the task's count and f / the replay rows' targets."""
    task = sum(n for b, n in zip(batches, counts) if not b.replay)
    replay = sum(n for b, n in zip(batches, counts) if b.replay)
    if not replay:
        return [1.0 / task] * len(batches)
    return [fraction / replay if b.replay else (1 - fraction) / task for b in batches]


def fisher_diagonal(backend: Backend, rows: list[Encoded]) -> dict[str, np.ndarray]:
    """The mean over rows of the squared gradient of each row's mean loss per token (empirical Fisher)."""
    fisher = None
    for row in rows:
        batch = make_batch([row])
        backend.forward_backward(batch, 1.0 / batch.n_targets)
        squares = {k: g * g for k, g in backend.take_gradients().items()}
        fisher = squares if fisher is None else {k: fisher[k] + squares[k] for k in fisher}
    return {k: v / len(rows) for k, v in fisher.items()}


def forgetting_summary(source: str, before: float, after: float) -> dict:
    """What summary.json says of forgetting: the general text's perplexity before and after, and the change."""
    return {"source": source, "perplexity_before": before, "perplexity_after": after,
            "change": after - before, "relative_change": after / before - 1 if math.isfinite(before) else None}
