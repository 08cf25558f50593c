"""The parts of a step's loss beside the task's, each an object with one interface (LossTerm): replay
of general text, distillation to the base model, and EWC's pull back to the start (train/guards.py
says what each computes and why).

A term takes part in a step in one or both of two ways:

- `batches(step)`: micro-batches run with the task's, shared among the processes and summed with
  the task's; the term's `share` of the step's loss weighs them (the task keeps 1 - the shares), and
  `logged` says what the step records of their summed losses. Replay is this kind.
- `backward(backend, step, scale, key)`: a gradient added after the processes' sum, computed whole
  and alike on every process; it returns what the step records. Distillation and EWC are this kind.
"""

from __future__ import annotations

import dataclasses

from twintune.backends.base import Backend
from twintune.data.batching import Batch, Encoded
from twintune.methods import Plan
from twintune.recipe import DistillConfig
from twintune.train.guards import DISTILL_STREAM, REPLAY_STREAM, fisher_diagonal, general_batch


class LossTerm:
    """One part of the step's loss beside the task's (a term of neither kind adds nothing)."""

    share: float = 0.0  # of the step's loss, for the micro-batches `batches` gives

    def batches(self, step: int) -> list[Batch]:
        """Micro-batches of this term in `step`, run and summed with the task's."""
        return []

    def logged(self, sums: list[float], batches: list[Batch]) -> dict[str, float]:
        """What the step records of this term's micro-batches, from their summed losses."""
        return {}

    def backward(self, backend: Backend, step: int, scale: float, dropout_key: int) -> dict[str, float]:
        """Add this term's gradient (times the loss scale) to the accumulated gradients; what the step records."""
        return {}


class Replay(LossTerm):
    """Rows of general text in every step: round(B * f / (1 - f)) of them beside the step's B task
    examples, so that f of the step's loss is the general text's mean loss per token."""

    def __init__(self, rows: list[Encoded], fraction: float, examples_per_step: int, seed: int, pad_id: int = 0):
        self.rows, self.share, self.seed, self.pad_id = rows, fraction, seed, pad_id
        self.rows_per_step = max(1, round(examples_per_step * fraction / (1 - fraction)))

    def batches(self, step: int) -> list[Batch]:
        batch = general_batch(self.rows, self.rows_per_step, step, self.seed, REPLAY_STREAM, self.pad_id)
        return [dataclasses.replace(batch, replay=True)]

    def logged(self, sums: list[float], batches: list[Batch]) -> dict[str, float]:
        return {"replay_loss": sums[0] / batches[0].n_targets}


class Distillation(LossTerm):
    """weight * T^2 * the mean KL(base || model) per token of `rows` general-text rows a step, the base
    being the model with its method switched off (the backend's base view, set here at the start)."""

    def __init__(self, rows: list[Encoded], config: DistillConfig, seed: int, backend: Backend, plan: Plan):
        self.rows, self.config, self.seed = rows, config, seed
        backend.set_base_view(plan, backend.trainable_state())

    def backward(self, backend: Backend, step: int, scale: float, dropout_key: int) -> dict[str, float]:
        c = self.config
        batch = general_batch(self.rows, c.rows, step, self.seed, DISTILL_STREAM)
        summed = backend.distill_backward(batch, c.temperature, scale * c.weight / batch.n_targets, dropout_key)
        return {"distill_kl": summed / batch.n_targets}


class ElasticWeights(LossTerm):
    """EWC: weight * sum(F * (theta - theta0)^2), F the Fisher diagonal on the general-text rows at the
    start's values theta0 (both taken here, before any step)."""

    def __init__(self, backend: Backend, rows: list[Encoded], weight: float):
        backend.set_penalty(fisher_diagonal(backend, rows), backend.trainable_state(), weight)

    def backward(self, backend: Backend, step: int, scale: float, dropout_key: int) -> dict[str, float]:
        penalty = backend.penalty()  # its value before the step
        backend.add_penalty_gradients(scale)
        return {"ewc_penalty": penalty}
