"""PPO, the RLHF of InstructGPT as TRL's PPOTrainer does it: the model samples a completion of each
prompt, a reward (a reward run's head, or a `python:module.function`) scores it, and several epochs
of clipped policy and value updates learn from those rollouts, with a per-token penalty for drifting
from the reference (the base with the method switched off: no copy).

A rollout is the prompts of `num_mini_batches` consecutive steps of the training order, sampled
once (tasks/sampling.py; seeded by the recipe's seed, the rollout and the micro-batch) and scored
with no gradient and no dropout: per completion token, the sampler's log-probability `old` and the
reference's `ref` (both of softmax(logits / temperature)), and the value head's estimate V. Then,
per token t of a completion of T tokens:

    kl_t = old_t - ref_t                        (k1; k3: e^(ref - old) - 1 - (ref - old))
    r_t  = -kl_coef kl_t  (+ the score at t = T - 1, less missing_eos_penalty if it did not end)
    δ_t  = r_t + γ V_{t+1} - V_t                (V_T = 0)
    A_t  = δ_t + γ λ A_{t+1},   R_t = A_t + V_t

A whitened over the rollout's completion tokens (mean 0, variance 1 with Bessel's correction and
1e-8, TRL's masked_whiten; `whiten_rewards` whitens r first, keeping its mean). Each of
`num_ppo_epochs` epochs shuffles the rollout's rows and cuts them into `num_mini_batches`
minibatches, one optimizer step each (its micro-batches of train.batch_size rows). Per token, with
ρ = exp(logp - old) and v the value head's new estimate:

    policy:  max(-A ρ, -A clip(ρ, 1 - cliprange, 1 + cliprange))
    value:   0.5 max((v - R)², (old V + clip(v - old V, ±cliprange_value) - R)²)
    loss:    policy + vf_coef value

summed over the step's completion tokens and divided by their count. The value head is a (1 x
width) layer with a bias on the policy's own last hidden state (TRL's ValueHead, `v_head.summary`,
of AutoModelForCausalLMWithValueHead; TRL's newer PPOTrainer keeps a second whole model instead):
it trains with the method and is saved beside the adapter (value_head.safetensors), which stays
the method's own, so PEFT, merge and generate read it as any adapter.

Where TRL differs: it scores the step after the last token (its `padding_mask_p1`) and averages
each loss per micro-batch; here the score lands on the completion's last token (its end-of-text
where it ended) and both losses are means over the step's tokens, so N processes and gradient
accumulation equal one batch. The learning rate follows train.schedule per optimizer step (TRL
steps it per rollout).

Metrics, TRL's names: objective/scores, objective/kl (per completion, summed over its tokens),
objective/non_score_reward, objective/rlhf_reward, loss/policy_avg, loss/value_avg,
policy/clipfrac_avg, val/clipfrac_avg, policy/approxkl_avg, val/ratio, completion_length.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from twintune.data.batching import Batch, make_batch
from twintune.keys import check
from twintune.methods.base import INSERT, Layer, Surgery
from twintune.tasks.objectives import ModelAccess, Objective, Ops
from twintune.tasks.sampling import SamplingTask

VALUE_HEAD_SLOT = "v_head"
VALUE_HEAD = ("v_head.weight", "v_head.bias")  # the backends' names; saved as TRL's v_head.summary.*
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_INIT_STD = 0.02  # transformers' initializer_range, as the classification head's
VALUE_HEAD_STREAM = 0x7A1E  # its initial values are drawn from (seed, VALUE_HEAD_STREAM)
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True, eq=False)
class ValueHeadLayer(Layer):
    """A (1 x width) linear layer with a bias, in the model's `v_head` slot: the value of each position."""


def value_head_surgery(hidden_size: int, seed: int) -> Surgery:
    """The value head as a surgery: weight ~ N(0, 0.02) drawn from the seed, bias 0.

    Example:
        >>> value_head_surgery(64, seed=0).values["v_head.weight"].shape
        (1, 64)
    """
    rng = np.random.default_rng([seed, VALUE_HEAD_STREAM])
    weight = (rng.standard_normal((1, hidden_size)) * VALUE_HEAD_INIT_STD).astype(np.float32)
    return Surgery(INSERT, VALUE_HEAD_SLOT, {VALUE_HEAD[0]: weight, VALUE_HEAD[1]: np.zeros(1, np.float32)},
                   ValueHeadLayer())


def split_value_head(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the method's values, the value head's: empty for runs of other tasks)."""
    return ({k: v for k, v in state.items() if k not in VALUE_HEAD},
            {k: v for k, v in state.items() if k in VALUE_HEAD})


def whiten(values: np.ndarray, shift_mean: bool = True) -> np.ndarray:
    """TRL's masked_whiten over the values given: (x - mean) / sqrt(var + 1e-8), the variance with
    Bessel's correction (0 for one value); `shift_mean=False` keeps the mean.

    Example:
        >>> whiten(np.array([1.0, 3.0])).round(6).tolist()
        [-0.707107, 0.707107]
    """
    mean = values.mean()
    variance = ((values - mean) ** 2).mean() * len(values) / (len(values) - 1) if len(values) > 1 else 0.0
    whitened = (values - mean) / np.sqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def discounted_advantages(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """GAE over one completion's tokens: A_t = δ_t + γλ A_{t+1}, δ_t = r_t + γ V_{t+1} - V_t, V_T = 0.

    Example:
        >>> discounted_advantages(np.array([0.0, 1.0]), np.zeros(2), 1.0, 0.5).tolist()
        [0.5, 1.0]
    """
    advantages, following, next_value = np.zeros_like(rewards), 0.0, 0.0
    for t in range(len(rewards) - 1, -1, -1):
        delta = rewards[t] + gamma * next_value - values[t]
        following = delta + gamma * lam * following
        advantages[t], next_value = following, values[t]
    return advantages


@dataclass(frozen=True)
class PPOLoss(Objective):
    """The task's clipped policy and value losses over a rollout's rows (see the module)."""

    task: "PPO"

    reads: ClassVar[str] = "logps_values"
    figures: ClassVar[tuple[str, ...]] = ("policy", "value", "policy_clipped", "value_clipped", "approxkl", "ratio",
                                          "scores", "kl", "completions", "tokens")

    @property
    def temperature(self) -> float:  # the log-probabilities are the sampler's: softmax(logits / temperature)
        return self.task.temperature

    @property
    def needs_reference(self) -> bool:
        return self.task.kl_coef > 0

    def count(self, batch: Batch) -> int:
        return batch.n_targets

    def prepare(self, batch: Batch, model: ModelAccess, seed: int) -> Batch:
        """A micro-batch of prompts as rollout rows: a completion of each, its score, and per token the
        sampler's log-probability, the value head's estimate and the reference's log-probability (no
        gradient, no dropout); then rewards, advantages and returns (`finish`, over this batch)."""
        task = self.task
        sampled = task.sample(batch, model, seed, 1)
        rows = make_batch(sampled.rows)
        both = model.values(rows, "logps_values", temperature=task.temperature)
        old = both[:, 0]
        reference = model.values(rows, "logps", reference=True, temperature=task.temperature) \
            if self.needs_reference else old.copy()
        ended = np.array([float(row.ids[-1] == model.eos_id and len(row.ids) > row.prompt_len)
                          for row in sampled.rows])
        scores = task.rewards(sampled, model) - task.missing_eos_penalty * (1 - ended)
        rows = dataclasses.replace(rows, reference=reference, target_data={"old_logps": old, "old_values": both[:, 1]},
                                   row_data={"scores": scores, "ended": ended})
        return self.finish([rows])[0]

    def finish(self, batches: list[Batch]) -> list[Batch]:
        """The rollout's per-token rewards, advantages (whitened over all its completion tokens) and
        returns, from its batches' scores, log-probabilities and values (taken as one list of rows)."""
        task = self.task
        old, values = (np.concatenate([b.target_data[key] for b in batches]) for key in ("old_logps", "old_values"))
        gap = np.concatenate([b.reference for b in batches]) - old
        kl = -gap if task.kl_estimator == "k1" else np.expm1(gap) - gap
        firsts = np.cumsum([0] + [b.input_ids.shape[0] for b in batches])
        owners = np.concatenate([b.target_rows() + first for b, first in zip(batches, firsts)])
        ends = np.flatnonzero(np.diff(np.append(owners, -1))) + 1  # where each row's targets end
        reward = -task.kl_coef * kl
        reward[ends - 1] += np.concatenate([b.row_data["scores"] for b in batches])
        if task.whiten_rewards:
            reward = whiten(reward, shift_mean=False)
        advantages = np.concatenate([discounted_advantages(r, v, task.gamma, task.lam)
                                     for r, v in zip(np.split(reward, ends[:-1]), np.split(values, ends[:-1]))])
        cut = np.cumsum([b.n_targets for b in batches])[:-1]
        row_kl = np.bincount(owners, kl, firsts[-1])
        return [dataclasses.replace(batch, target_data={**batch.target_data, "advantages": w, "returns": a + v},
                                    row_data={**batch.row_data, "kl": row_kl[first:first + batch.input_ids.shape[0]]})
                for batch, w, a, v, first in zip(batches, np.split(whiten(advantages), cut), np.split(advantages, cut),
                                                 np.split(values, cut), firsts)]

    def loss(self, ops: Ops, values, batch: Batch) -> tuple[object, list]:
        task, data = self.task, batch.target_data
        logps, estimates = values[:, 0], values[:, 1]
        old, advantage = ops.array(data["old_logps"]), ops.array(data["advantages"])
        old_values, returns = ops.array(data["old_values"]), ops.array(data["returns"])
        difference = logps - old
        ratio = ops.exp(difference)
        unclipped, clipped = -advantage * ratio, -advantage * ops.clip(ratio, 1 - task.cliprange, 1 + task.cliprange)
        policy = ops.maximum(unclipped, clipped)
        near = old_values + ops.clip(estimates - old_values, -task.cliprange_value, task.cliprange_value)
        far_loss, near_loss = (estimates - returns) ** 2, (near - returns) ** 2
        value = 0.5 * ops.maximum(far_loss, near_loss)
        rows = batch.input_ids.shape[0]
        return policy.sum() + task.vf_coef * value.sum(), [
            policy.sum(), value.sum(), (clipped > unclipped).sum(), (near_loss > far_loss).sum(),
            (0.5 * difference * difference).sum(), ratio.sum(), ops.array(batch.row_data["scores"].sum()),
            ops.array(batch.row_data["kl"].sum()), ops.array(np.array(float(rows))),
            ops.array(np.array(float(batch.n_targets)))]

    def summarize(self, sums: np.ndarray, examples: int) -> dict[str, float]:
        named = dict(zip(("loss", *self.figures), map(float, sums)))
        tokens, completions = max(named["tokens"], 1.0), max(named["completions"], 1.0)
        scores, kl = named["scores"] / completions, named["kl"] / completions
        measured = {"objective/kl": kl, "objective/non_score_reward": -self.task.kl_coef * kl} if self.needs_reference \
            else {}  # kl_coef 0: no reference, no KL to report
        return {"loss": named["loss"] / examples, "objective/scores": scores, **measured,
                "objective/rlhf_reward": scores - self.task.kl_coef * kl,
                "loss/policy_avg": named["policy"] / tokens, "loss/value_avg": named["value"] / tokens,
                "policy/clipfrac_avg": named["policy_clipped"] / tokens,
                "val/clipfrac_avg": named["value_clipped"] / tokens,
                "policy/approxkl_avg": named["approxkl"] / tokens, "val/ratio": named["ratio"] / tokens,
                "completion_length": named["tokens"] / completions}


@dataclass(frozen=True)
class PPO(SamplingTask):
    """PPO on prompts: rollouts scored by a reward, a value head, GAE, clipped updates over several epochs."""

    temperature: float = 0.7  # TRL's PPOConfig default
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    whiten_rewards: bool = False
    missing_eos_penalty: float = 0.0  # subtracted from the score of a completion that did not end (TRL: None)

    name: ClassVar[str] = "ppo"
    description: ClassVar[str] = "prompts: RLHF with PPO, a value head and a reward model (or function)"
    metrics: ClassVar[tuple[str, ...]] = ("val_objective/scores", "val_objective/kl", "val_loss")
    progress: ClassVar[str | None] = "objective/scores"
    learns_from_rollouts: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        check(self.kl_coef >= 0, f"recipe key 'task.kl_coef' must be 0 or more, got {self.kl_coef}.")
        check(self.kl_estimator in KL_ESTIMATORS, f"recipe key 'task.kl_estimator' must be k1 or k3, got "
                                                  f"{self.kl_estimator!r}.")
        for key in ("gamma", "lam"):
            check(0 <= getattr(self, key) <= 1, f"recipe key 'task.{key}' must be in [0, 1], got {getattr(self, key)}.")
        for key in ("cliprange", "cliprange_value"):
            check(getattr(self, key) > 0, f"recipe key 'task.{key}' must be above 0, got {getattr(self, key)}.")
        check(self.vf_coef >= 0, f"recipe key 'task.vf_coef' must be 0 or more, got {self.vf_coef}.")
        for key in ("num_ppo_epochs", "num_mini_batches"):
            check(getattr(self, key) >= 1, f"recipe key 'task.{key}' must be 1 or more, got {getattr(self, key)}.")
        check(self.missing_eos_penalty >= 0, "recipe key 'task.missing_eos_penalty' must be 0 or more, got "
                                             f"{self.missing_eos_penalty}.")

    def surgeries(self, spec, labels: int, seed: int) -> tuple[Surgery, ...]:
        return (value_head_surgery(spec.hidden_size, seed),)

    @property
    def steps_per_rollout(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches

    def optimizer_steps(self, data_steps: int) -> int:
        """A rollout takes `num_mini_batches` steps' prompts of the training order and trains
        num_ppo_epochs x num_mini_batches optimizer steps on them."""
        return math.ceil(data_steps / self.num_mini_batches) * self.steps_per_rollout

    @property
    def objective(self) -> PPOLoss:
        return PPOLoss(self)

    def evaluate(self, scorer, split: str):
        """The split's prompts sampled (a fixed seed) and scored: the score, the KL and the value loss
        (the ratio, its clipping and the policy loss are those of an update, which evaluation makes none of)."""
        report = super().evaluate(scorer, split)
        return dataclasses.replace(report, figures={k: v for k, v in report.figures.items() if k not in UPDATE_FIGURES})


UPDATE_FIGURES = ("loss/policy_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "policy/approxkl_avg", "val/ratio")
