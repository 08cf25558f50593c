"""A task's loss when it is not the sum of its rows' target-token cross-entropies: preference losses
over pairs of rows, a reward model's Bradley-Terry loss.

An `Objective` is written once, on arrays of any framework: the backend hands it the model's value
at each target of a micro-batch (`reads`: the target token's log-probability, or a one-output head's
score), with autograd on, and an `Ops` of its framework's functions; the objective returns its
summed loss and the figures a run logs. Evaluation calls the same objective on numpy values with
NUMPY. So MLX, torch and the tests' numpy formulas compute one algorithm, and a backend knows no
preference loss by name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Protocol

import numpy as np

from twintune.data.batching import Batch


class Ops(Protocol):
    """The functions an objective computes with, each on one framework's arrays (backends/X/ops.py)."""

    def array(self, values: np.ndarray):
        """A numpy array as the framework's, in the run's precise dtype (float32; float64 in float64)."""

    def exp(self, x): ...
    def expm1(self, x): ...
    def log(self, x): ...
    def log1p(self, x): ...
    def where(self, condition, x, y): ...
    def log_sigmoid(self, x):
        """log(1 / (1 + e^-x)), accurate for large |x| (its gradient, sigmoid(-x), too)."""
    def relu(self, x): ...
    def minimum(self, x, y): ...
    def maximum(self, x, y): ...
    def clip(self, x, low: float, high: float): ...
    def stop_gradient(self, x): ...


class ModelAccess(Protocol):
    """What an objective's `prepare` may ask of the run's model, with no gradient (train/step.py gives it)."""

    eos_id: int

    def values(self, batch: Batch, reads: str, reference: bool = False, temperature: float = 1.0) -> np.ndarray:
        """(N,) the model's values at the batch's targets (the backend's target_values); (N, 2) for
        "logps_values"."""

    def sample(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float,
               seeds: list[int]) -> list[list[int]]:
        """New token ids after each of the prompts (one length), sampled together with the KV cache, each
        from numpy's generator seeded with its seed (the same tokens on both backends); the
        end-of-text token last where it ended there."""

    def decode(self, ids: list[int]) -> str:
        """Token ids as text."""

    def reward_scores(self, rows: list[list[int]]) -> np.ndarray:
        """(rows,) the task's reward model's scores of token rows (prompt and completion), at each last token."""


class NumpyOps:
    """Ops on numpy arrays, in float64: evaluation's, and the formulas' own check."""

    def array(self, values):
        return np.asarray(values, np.float64)

    exp, expm1, log, log1p = staticmethod(np.exp), staticmethod(np.expm1), staticmethod(np.log), staticmethod(np.log1p)
    where = staticmethod(np.where)
    minimum, maximum, clip = staticmethod(np.minimum), staticmethod(np.maximum), staticmethod(np.clip)

    @staticmethod
    def log_sigmoid(x):
        return -np.logaddexp(0.0, -x)

    @staticmethod
    def relu(x):
        return np.maximum(x, 0.0)

    @staticmethod
    def stop_gradient(x):
        return x



NUMPY = NumpyOps()


class Objective:
    """A loss over a micro-batch's examples (a pair of rows, or one row), summed; the loop divides by
    the step's global count of examples, so N processes and gradient accumulation equal one batch."""

    # Per target: "logps" (the target token's log-probability), "scores" (a one-output head's), or
    # "logps_values" ((N, 2): the log-probability and the value head's estimate, PPO's).
    reads: ClassVar[str] = "logps"
    temperature: float = 1.0  # the log-probabilities are of softmax(logits / temperature): a sampler's own
    figures: ClassVar[tuple[str, ...]] = ()  # what it sums besides the loss: mean per example in metrics.jsonl
    needs_reference: bool = False  # whether batches carry the reference model's log-probabilities

    def loss(self, ops: Ops, values, batch: Batch) -> tuple[object, list]:
        """(the summed loss, the figures' sums), framework arrays, from `values` (N,) at the batch's targets."""
        raise NotImplementedError

    def prepare(self, batch: Batch, model: ModelAccess, seed: int) -> Batch:
        """The whole micro-batch with what the loss needs of it beforehand, computed without gradient
        (KTO's z0; GRPO's completions, sampled from `seed`, and their advantages): called on every
        process alike, before the batch is shared and counted."""
        return batch

    def count(self, batch: Batch) -> int:
        """What the step's loss is a mean over: the batch's examples (pairs, rows)."""
        return batch.examples

    def summarize(self, sums: np.ndarray, examples: int) -> dict[str, float]:
        """What a run logs of summed [loss, *figures] over `examples`: each a mean per example."""
        return {name: float(total) / examples for name, total in zip(("loss", *self.figures), sums)}


def with_reference(batch: Batch, values: Callable[..., np.ndarray], temperature: float = 1.0) -> Batch:
    """The batch with its reference log-probabilities (the base with the method off, no dropout), unless
    it carries them already (precomputed)."""
    if batch.reference is not None:
        return batch
    return dataclasses.replace(batch, reference=values(batch, "logps", reference=True, temperature=temperature))


def log1mexp(ops: Ops, x):
    """log(1 - e^x) for x < 0, without cancellation on either side of -ln 2 (TRL's ORPO computes it so)."""
    return ops.where(x < -0.6931471805599453, ops.log1p(-ops.exp(x)), ops.log(-ops.expm1(x)))


def row_sums(ops: Ops, values, batch: Batch):
    """(answers,) each answer's sum of `values` (N,) over its targets (an answer is a row, or half of
    one where pairs share their prompt): one matrix product, the same on every framework, so a sum
    rounds alike wherever it is taken."""
    owners = batch.target_answers()
    onehot = (np.arange(batch.answers)[:, None] == owners[None, :]).astype(np.float64)
    return ops.array(onehot) @ values


def row_counts(batch: Batch) -> np.ndarray:
    """(answers,) how many targets each answer has (row_sums' answers)."""
    return np.bincount(batch.target_answers(), minlength=batch.answers).astype(np.float64)
