"""PPO's rollouts (tasks/ppo.py): which prompts a rollout samples, which of its rows each optimizer
step trains on, and the rollout kept in checkpoints.

Rollout r is sampled at step r x S (S = num_ppo_epochs x num_mini_batches) from the prompts of the
training order's steps r M .. r M + M - 1 (M = num_mini_batches), on every process alike (each
process then trains its share of each micro-batch). Step r S + e M + b trains minibatch b of epoch
e: the rollout's rows permuted by a generator seeded with (seed, r, e), cut into M minibatches,
each into micro-batches of train.batch_size rows. A checkpoint between two rollouts' first steps
saves the rollout (its rows' tokens and figures), since the model that sampled it is gone; a resumed
run trains on the same rows in the same order.
"""

from __future__ import annotations

import numpy as np

from twintune.data.batching import Batch, Encoded, batch_rows, make_batch
from twintune.dropout import dropout_key
from twintune.tasks.objectives import ModelAccess

ROLLOUT_STREAM = 0x9E0  # the epochs' permutations are drawn from (seed, rollout, epoch, ROLLOUT_STREAM)


class Rollouts:
    """The current rollout of a PPO run and the micro-batches of each step's minibatch of it."""

    def __init__(self, task, order, batch_size: int, seed: int):
        self.task, self.order, self.batch_size, self.seed = task, order, batch_size, seed
        self.index: int | None = None  # which rollout `rows` are
        self.rows: list[Encoded] = []

    def step_batches(self, step: int, model: ModelAccess) -> list[Batch]:
        """The micro-batches optimizer step `step` trains on, sampling its rollout first where the step
        begins one."""
        task = self.task
        rollout, within = divmod(step, task.steps_per_rollout)
        if self.index != rollout:
            self.rows, self.index = self._sample(rollout, model), rollout
        epoch, part = divmod(within, task.num_mini_batches)
        order = np.random.default_rng([self.seed, rollout, epoch, ROLLOUT_STREAM]).permutation(len(self.rows))
        mine = np.array_split(order, task.num_mini_batches)[part]
        return [make_batch([self.rows[i] for i in mine[s: s + self.batch_size]])
                for s in range(0, len(mine), self.batch_size)]

    def _sample(self, rollout: int, model: ModelAccess) -> list[Encoded]:
        """Rollout `rollout`'s rows: its prompts' micro-batches prepared (sampled, scored), then its
        advantages taken over all of them."""
        objective, first = self.task.objective, rollout * self.task.num_mini_batches
        prompts = [b for step in range(first, first + self.task.num_mini_batches) for b in self.order.step_batches(step)]
        prepared = [objective.prepare(b, model, dropout_key(self.seed, rollout, i)) for i, b in enumerate(prompts)]
        return [row for batch in objective.finish(prepared) for row in batch_rows(batch)]

    def state(self) -> dict[str, np.ndarray]:
        """The rollout as arrays (a checkpoint's rollout.safetensors); empty before the first."""
        if self.index is None:
            return {}
        rows = self.rows
        arrays = {"index": np.array([self.index], np.int64),
                  "lengths": np.array([len(r.ids) for r in rows], np.int64),
                  "prompt_lengths": np.array([r.prompt_len for r in rows], np.int64),
                  "ids": np.concatenate([r.ids for r in rows]).astype(np.int64),
                  "reference": np.concatenate([r.reference for r in rows])}
        arrays.update({f"target.{k}": np.concatenate([r.target_data[k] for r in rows]) for k in rows[0].target_data})
        arrays.update({f"row.{k}": np.array([r.row_data[k] for r in rows]) for k in rows[0].row_data})
        return arrays

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """The rollout a checkpoint saved (state()'s arrays)."""
        if not arrays:
            self.index, self.rows = None, []
            return
        lengths, prompts = arrays["lengths"], arrays["prompt_lengths"]
        ids = np.split(arrays["ids"].astype(np.int32), np.cumsum(lengths)[:-1])
        targets = np.cumsum(lengths - prompts)[:-1]
        per_target = {k[len("target."):]: np.split(v, targets) for k, v in arrays.items() if k.startswith("target.")}
        reference = np.split(arrays["reference"], targets)
        self.rows = [Encoded(ids[i], int(prompts[i]), 0, reference=reference[i],
                             target_data={k: v[i] for k, v in per_target.items()},
                             row_data={k[len("row."):]: v[i] for k, v in arrays.items() if k.startswith("row.")})
                     for i in range(len(lengths))]
        self.index = int(arrays["index"][0])
