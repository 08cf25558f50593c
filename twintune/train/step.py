"""One optimizer step: the step's micro-batches forward and backward (each process its share), the
loss terms beside the task's (train/terms.py), then clipping and the optimizer.

In float16 the loss is scaled (LossScaler); a step whose gradients overflowed is skipped, logged
with "skipped": true, and still counts as a step of the schedule.
"""

from __future__ import annotations

import math
import time

import numpy as np

from twintune.data.batching import Batch, Encoded, eval_batches
from twintune.dropout import dropout_key
from twintune.errors import TwintuneError
from twintune.data.documents import eos_id
from twintune.generation import generate_batch
from twintune.tasks.objectives import with_reference
from twintune.train.build import Run
from twintune.train.distributed import share, share_bounds, take_rows
from twintune.train.guards import loss_weights
from twintune.train.schedule import learning_rate


def train_step(run: Run, step: int) -> dict:
    """One optimizer step; the record metrics.jsonl gets for it.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> train_step(prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch"), 0)["step"]
        1
    """
    t = run.recipe.train
    task, *extra = step_batches(run, step)  # the whole step's, on every process
    objective = run.recipe.task.objective  # None: the loss is the rows' target tokens' cross-entropy
    if objective is not None and run.rollouts is None:  # what its loss needs of each whole micro-batch,
        model = RunModel(run)                           # alike on every process (a rollout's rows have it)
        task = [objective.prepare(b, model, dropout_key(run.recipe.seed, step, i)) for i, b in enumerate(task)]
    batches = [b for part in (task, *extra) for b in part]
    scale = run.loss_scaler.scale if run.loss_scaler else 1.0
    counts = [objective.count(b) if objective and not b.replay else b.n_targets for b in batches]
    weights = loss_weights(batches, counts, sum(term.share for term in run.terms))
    # Each process runs its share of every micro-batch; the weights are the whole step's (global) counts.
    sums = [_share_forward_backward(run, b, scale * weight, dropout_key(run.recipe.seed, step, i),
                                    None if b.replay else objective)
            for i, (b, weight) in enumerate(zip(batches, weights))]
    sync_seconds = None
    if run.world.size > 1:
        sums, sync_seconds = _sum_over_processes(run, sums)
    examples = sum(counts[: len(task)])
    task_sums = [sum(float(s[k]) for s in sums[: len(task)]) for k in range(len(sums[0]))]
    loss = task_sums[0] / examples
    if not math.isfinite(loss):
        raise TwintuneError(f"the training loss became {loss} at step {step + 1}; lower train.lr "
                            "or set train.max_grad_norm (the last saved adapter, if any, is kept).")
    sums = [float(s[0]) for s in sums]
    logged, start = {}, len(task)
    for term, own in zip(run.terms, extra):
        logged.update(term.logged(sums[start: start + len(own)], own))
        start += len(own)
    for term in run.terms:  # after the processes' sum: every process adds the same gradient
        logged.update(term.backward(run.backend, step, scale, dropout_key(run.recipe.seed, step, len(batches))))
    lr = learning_rate(step, t.base_lr, run.total_steps, t.warmup_steps, t.schedule)
    grad_norm = run.backend.optimizer_step(lr, t.max_grad_norm, grad_scale=scale)
    lr = t.optimizer.learning_rate(lr, step + 1)  # what it used (Adafactor's relative step: its own)
    finite = math.isfinite(grad_norm)
    if not finite and scale <= 1.0:
        raise TwintuneError(f"the gradients became {grad_norm} at step {step + 1}; lower train.lr or use "
                            "dtype=float32 (the last saved adapter, if any, is kept).")
    record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm if finite else None,
              "tokens": sum(b.n_real_tokens for b in batches)}
    if run.world.size > 1:  # the examples each process took
        record["rank_examples"] = np.sum([np.diff(share_bounds(b.examples, run.world)) for b in batches],
                                         axis=0).tolist()
        record["sync_seconds"] = sync_seconds
    record.update(logged)
    if objective:  # its figures, per example of the step (TRL's rewards/chosen, ...)
        record.update({name: value for name, value in objective.summarize(np.array(task_sums), examples).items()
                       if name != "loss"})
    if run.loss_scaler:
        run.loss_scaler.update(finite)
        record["skipped"] = not finite
    return record


class RunModel:
    """What an objective's `prepare` asks of a run's model (tasks/objectives.py ModelAccess): values at
    targets and seeded sampling with the KV cache (twintune/generation.py), no gradient."""

    def __init__(self, run: Run):
        self.run, self.eos_id = run, eos_id(run.encoder.tokenizer)

    def values(self, batch: Batch, reads: str, reference: bool = False, temperature: float = 1.0) -> np.ndarray:
        return self.run.backend.target_values(batch, reads, reference=reference, temperature=temperature)

    def sample(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float,
               seeds: list[int]) -> list[list[int]]:
        run = self.run
        found = generate_batch(run.backend, prompts, context=run.spec.max_positions,
                               virtual_tokens=run.method.virtual_tokens, eos_id=self.eos_id, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seeds=seeds)
        return [ids + [self.eos_id] if reason == "eos" else ids for ids, reason in found]

    def decode(self, ids: list[int]) -> str:
        return self.run.encoder.tokenizer.decode(ids)

    def reward_scores(self, rows: list[list[int]]) -> np.ndarray:
        scores = np.zeros(len(rows))
        encoded = [Encoded(np.array(ids, np.int32), len(ids), 0, class_target=True) for ids in rows]
        for batch in eval_batches(encoded, self.run.recipe.train.eval_batch_size):
            scores[batch.example_index] = self.run.reward_model.target_values(batch, "scores")
        return scores


def step_batches(run: Run, step: int) -> list[list[Batch]]:
    """The micro-batches of a step, in parts: the task's (its training order's; PPO's, of its rollout),
    then each loss term's (replay's rows; distillation and EWC have none)."""
    task = run.rollouts.step_batches(step, RunModel(run)) if run.rollouts else run.order.step_batches(step)
    return [task, *(term.batches(step) for term in run.terms)]


def _sum_over_processes(run: Run, sums: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """The micro-batches' losses (and an objective's figures) and the gradients summed over the
    processes; the seconds it took (waiting for the slowest process included)."""
    started = time.perf_counter()
    sizes = [len(s) for s in sums]
    flat = run.backend.all_sum(np.concatenate(sums).astype(np.float64))
    run.backend.sum_gradients()
    return np.split(flat, np.cumsum(sizes)[:-1]), time.perf_counter() - started


def _share_forward_backward(run: Run, batch: Batch, loss_scale: float, key: int, objective=None) -> np.ndarray:
    """This process's share of a micro-batch, forward and backward; its summed loss (and an objective's
    summed figures). A batch with fewer rows than processes leaves some without a share: they add
    nothing, but a sharded model's gathers need every process in every forward, so those run one
    row at weight zero."""
    part = share(batch, run.world)
    if part is None:
        if run.backend.sharded:
            _forward_backward(run.backend, take_rows(batch, 0, batch.rows_per_example), 0.0, key, objective)
        return np.zeros(1 + (len(objective.figures) if objective else 0))
    return _forward_backward(run.backend, part, loss_scale, key, objective)


def _forward_backward(backend, batch: Batch, loss_scale: float, key: int, objective) -> np.ndarray:
    if objective is None:
        return np.array([backend.forward_backward(batch, loss_scale, key)])
    if objective.needs_reference:
        batch = with_reference(batch, backend.target_values, objective.temperature)
    return backend.objective_backward(batch, objective, loss_scale, key)
