"""GRPO: the model samples a group of completions per prompt, a reward scores them, and each
completion's tokens are pushed up or down by its advantage within its group (TRL's GRPOTrainer).

Each micro-batch of prompts becomes, before its forward (`prepare`, on every process alike), its
`group_size` completions per prompt, sampled and scored as tasks/sampling.py says (seeded by the
recipe's seed, the step and the micro-batch). Advantages: `A = (r - mean of its group) / (std of
its group + 1e-4)` (std with Bessel's correction, as torch's). Per completion token, ρ = exp(logp -
logp_old) with log-probabilities of softmax(logits / temperature), the sampler's (one update per
sampling, so ρ = 1 in value and the gradient is A ∇logp):

    -min(ρ A, clip(ρ, 1 - epsilon, 1 + epsilon_high) A) + beta (e^(ref - logp) - (ref - logp) - 1)

summed over the step's completion tokens and divided by their count (TRL's "dapo"); with beta > 0
the reference is the base with the method switched off. Logged: `reward` (mean per completion),
`reward_std` (mean within-group spread), `completion_length`, and `kl` (with beta > 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from twintune.data.batching import Batch, make_batch
from twintune.keys import check
from twintune.tasks.objectives import ModelAccess, Objective, Ops
from twintune.tasks.sampling import SamplingTask

@dataclass(frozen=True)
class GRPOLoss(Objective):
    """The task's clipped, group-relative policy loss over sampled completions (see the module)."""

    task: "GRPO"

    figures: ClassVar[tuple[str, ...]] = ("reward", "reward_std", "kl", "completions", "tokens")

    @property
    def needs_reference(self) -> bool:
        return self.task.beta > 0

    def count(self, batch: Batch) -> int:
        return batch.n_targets

    @property
    def temperature(self) -> float:  # its log-probabilities are the sampler's: softmax(logits / temperature)
        return self.task.temperature

    def prepare(self, batch: Batch, model: ModelAccess, seed: int) -> Batch:
        sampled = self.task.sample(batch, model, seed, self.task.group_size)
        rewards = self.task.rewards(sampled, model)
        size = self.task.group_size
        groups = rewards.reshape(-1, size)
        spread = groups.std(axis=1, ddof=1)
        advantages = ((groups - groups.mean(axis=1, keepdims=True)) / (spread[:, None] + 1e-4)).reshape(-1)
        return dataclasses.replace(make_batch(sampled.rows), group=size, row_data={
            "advantages": advantages, "rewards": rewards, "spread": np.repeat(spread, size)})

    def loss(self, ops: Ops, values, batch: Batch) -> tuple[object, list]:
        owners = batch.target_rows()
        advantage = ops.array(batch.row_data["advantages"][owners])
        ratio = ops.exp(values - ops.stop_gradient(values))
        clipped = ops.clip(ratio, 1 - self.task.epsilon, 1 + self.task.epsilon_high)
        losses = -ops.minimum(ratio * advantage, clipped * advantage)
        kl = ops.array(np.zeros(1))
        if self.task.beta > 0:
            gap = ops.array(batch.reference) - values
            per_token = ops.exp(gap) - gap - 1
            losses = losses + self.task.beta * per_token
            kl = per_token
        rows = batch.input_ids.shape[0]
        return losses.sum(), [ops.array(batch.row_data["rewards"].sum()), ops.array(batch.row_data["spread"].sum()),
                              kl.sum(), ops.array(np.array(float(rows))), ops.array(np.array(float(batch.n_targets)))]

    def summarize(self, sums: np.ndarray, examples: int) -> dict[str, float]:
        named = dict(zip(("loss", *self.figures), map(float, sums)))
        completions = max(named["completions"], 1.0)
        figures = {"loss": named["loss"] / examples, "reward": named["reward"] / completions,
                   "reward_std": named["reward_std"] / completions,
                   "completion_length": named["tokens"] / completions}
        if self.task.beta > 0:
            figures["kl"] = named["kl"] / max(named["tokens"], 1.0)
        return figures


@dataclass(frozen=True)
class GRPO(SamplingTask):
    """GRPO on prompts: sampled groups of completions, a reward function, group-relative advantages."""

    group_size: int = 4
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2

    name: ClassVar[str] = "grpo"
    description: ClassVar[str] = "prompts: groups of sampled completions scored by a reward function (GRPO)"
    metrics: ClassVar[tuple[str, ...]] = ("val_reward", "val_loss")
    progress: ClassVar[str | None] = "reward"
    no_gradient: ClassVar[str] = (
        "every completion of a prompt got the same reward, so every advantage was 0 (GRPO learns from rewards that "
        "differ within a group): a reward the model never earns (give partial credit) or samples too alike")

    @classmethod
    def no_gradient_tries(cls, keys: dict) -> tuple[str, ...]:
        """More completions a prompt (a chance for one to differ), and sampling at temperature 1 at least."""
        more = (f"task.group_size={2 * keys.get('group_size', cls.group_size)}",)
        return more + (("task.temperature=1",) if keys.get("temperature", 1.0) < 1 else ())

    def validate(self) -> None:
        super().validate()
        check(self.group_size >= 2, f"recipe key 'task.group_size' must be 2 or more (advantages compare a group's "
                                    f"completions), got {self.group_size}.")
        check(self.beta >= 0, f"recipe key 'task.beta' must be 0 or more, got {self.beta}.")
        check(self.epsilon > 0 and self.epsilon_high > 0, "recipe keys 'task.epsilon' and 'task.epsilon_high' must be "
                                                          "above 0.")

    @property
    def rows_per_example(self) -> int:  # a prompt's rows in a step: its completions
        return self.group_size

    @property
    def objective(self) -> GRPOLoss:
        return GRPOLoss(self)
