"""GRPO: the model samples a group of completions per prompt, a reward function scores them, and each
completion's tokens are pushed up or down by its advantage within its group (TRL's GRPOTrainer).

Each micro-batch of prompts becomes, before its forward (`prepare`, on every process alike), its
`group_size` completions per prompt: sampled with the KV cache at `temperature` and `top_p` from
numpy's generator seeded by (the recipe's seed, the step, the micro-batch, the prompt, the
sample), so both backends sample the same tokens; ended by end-of-text (kept, as a target) or
after `max_new_tokens`. `source: synthetic` gives openings of synthetic sentences to continue
(`synthetic_prompts: openings`) or the preference pairs' sentiment questions with the right answer
as a `label` column (`questions`). The reward function `reward: python:module.function` gets the prompts,
the completions' texts and the prompts' other columns (TRL's signature) and returns one number a
completion. Advantages: `A = (r - mean of its group) / (std of its group + 1e-4)` (std with
Bessel's correction, as torch's). Per completion token, ρ = exp(logp - logp_old) (one update per
sampling, so ρ = 1 in value and the gradient is A ∇logp):

    -min(ρ A, clip(ρ, 1 - epsilon, 1 + epsilon_high) A) + beta (e^(ref - logp) - (ref - logp) - 1)

summed over the step's completion tokens and divided by their count (TRL's "dapo"); with beta > 0
the reference is the base with the method switched off. Logged: `reward` (mean per completion),
`reward_std` (mean within-group spread), `completion_length`, and `kl` (with beta > 0).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from twintune.data.batching import Batch, Encoded, Encoder, make_batch
from twintune.data.documents import random_splits
from twintune.data.preferences import PROMPTS, load_rows
from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.tasks.objectives import ModelAccess, Objective, Ops
from twintune.tasks.preference import PairTask
from twintune.tasks.task import TaskData

PYTHON_PREFIX = "python:"


def reward_function(name: str) -> Callable:
    """The function `python:module.function` names, imported; refused by one sentence when it cannot be.

    Example:
        >>> reward_function("python:twintune.rewards.upbeat")(["Sales"], [" rose ."])
        [1.0]
    """
    if not name.startswith(PYTHON_PREFIX) or "." not in name[len(PYTHON_PREFIX):]:
        raise TwintuneError(f"task.reward must name a function as python:module.function, got {name!r}.")
    module, _, function = name[len(PYTHON_PREFIX):].rpartition(".")
    try:
        found = getattr(importlib.import_module(module), function)
    except ImportError as error:
        raise TwintuneError(f"task.reward {name}: module {module!r} cannot be imported ({error}).") from None
    except AttributeError:
        raise TwintuneError(f"task.reward {name}: module {module!r} has no {function!r}.") from None
    if not callable(found):
        raise TwintuneError(f"task.reward {name} is not a function.")
    return found


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

    def prepare(self, batch: Batch, model: ModelAccess, seed: int) -> Batch:
        task, prompts, rows, columns = self.task, [], [], []
        for j in range(batch.input_ids.shape[0]):
            prompt = batch.input_ids[j, :batch.lengths[j]].tolist()
            prompts.append(model.decode(prompt))
            for k in range(task.group_size):
                draw = int(np.random.SeedSequence([seed, j, k]).generate_state(1, np.uint64)[0])  # stable anywhere
                completion = model.sample(prompt, task.max_new_tokens, task.temperature, task.top_p, seed=draw)
                rows.append(Encoded(np.array(prompt + completion, np.int32), len(prompt), 0))
            columns.append((batch.columns or [None] * len(prompts))[j] or {})
        size = task.group_size
        if task.reward:
            texts = [model.decode(row.ids[row.prompt_len:].tolist()) for row in rows]
            rewards = self.rewards([p for p in prompts for _ in range(size)], texts,
                                   [c for c in columns for _ in range(size)])
        else:  # the reward model's score of prompt + completion, at its last token
            rewards = model.reward_scores([row.ids.tolist() for row in rows])
        groups = rewards.reshape(-1, size)
        spread = groups.std(axis=1, ddof=1)
        advantages = ((groups - groups.mean(axis=1, keepdims=True)) / (spread[:, None] + 1e-4)).reshape(-1)
        return dataclasses.replace(make_batch(rows), group=size, row_data={
            "advantages": advantages, "rewards": rewards, "spread": np.repeat(spread, size)})

    def rewards(self, prompts: list[str], completions: list[str], columns: list[dict]) -> np.ndarray:
        """The reward function's numbers for the completions, checked: one finite number each."""
        keys = sorted({key for c in columns for key in c if key != "prompt"})
        try:
            given = reward_function(self.task.reward)(prompts, completions, **{key: [c.get(key) for c in columns]
                                                                          for key in keys})
        except TwintuneError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's function: its failure as one sentence
            first = (str(error).strip().splitlines() or [""])[0]
            raise TwintuneError(f"task.reward {self.task.reward} raised {type(error).__name__} ({first}) when called as "
                                f"f(prompts, completions, {', '.join(f'{k}=...' for k in keys) or '**columns'}).") from None
        try:
            values = np.asarray(given, np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.shape != (len(completions),) or not np.isfinite(values).all():
            raise TwintuneError(f"task.reward {self.task.reward} must return one finite number for each of the "
                                f"{len(completions)} completions it is given; it returned {_shape(given)}.")
        return values

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


def _shape(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


@dataclass(frozen=True)
class GRPO(PairTask):
    """GRPO on prompts: sampled groups of completions, a reward function, group-relative advantages."""

    reward: str = ""
    reward_model: str = ""
    group_size: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    synthetic_prompts: str = "openings"  # data.source synthetic: openings to continue | questions (the pairs')

    cannot_predict: ClassVar[str | None] = ("it generates completions for a reward function, not labels; evaluate "
                                            "its reward with twintune eval, or generate with twintune generate")
    name: ClassVar[str] = "grpo"
    description: ClassVar[str] = "prompts: groups of sampled completions scored by a reward function (GRPO)"
    metrics: ClassVar[tuple[str, ...]] = ("val_reward", "val_loss")

    def validate(self) -> None:
        check(bool(self.reward) != bool(self.reward_model),
              "task grpo needs one reward: a function as task.reward: python:module.function (e.g. "
              "python:twintune.rewards.upbeat), or a reward run as task.reward_model: RUN" +
              ("; it has both." if self.reward else "."))
        if self.reward:
            reward_function(self.reward)
        check(self.group_size >= 2, f"recipe key 'task.group_size' must be 2 or more (advantages compare a group's "
                                    f"completions), got {self.group_size}.")
        check(self.max_new_tokens >= 1, f"recipe key 'task.max_new_tokens' must be 1 or more, got {self.max_new_tokens}.")
        check(self.temperature > 0, f"recipe key 'task.temperature' must be above 0 (GRPO samples), got {self.temperature}.")
        check(0 < self.top_p <= 1, f"recipe key 'task.top_p' must be in (0, 1], got {self.top_p}.")
        check(self.beta >= 0, f"recipe key 'task.beta' must be 0 or more, got {self.beta}.")
        check(self.synthetic_prompts in ("openings", "questions"), "recipe key 'task.synthetic_prompts' must be "
              f"openings or questions, got {self.synthetic_prompts!r}.")
        check(self.epsilon > 0 and self.epsilon_high > 0, "recipe keys 'task.epsilon' and 'task.epsilon_high' must be "
                                                          "above 0.")

    @property
    def rows_per_example(self) -> int:  # a prompt's rows in a step: its completions
        return self.group_size

    @property
    def objective(self) -> GRPOLoss:
        return GRPOLoss(self)

    def data(self, data, seed: int, encoder: Encoder, length: int) -> TaskData:
        rows = load_rows(data.source, PROMPTS, synthetic_size=data.synthetic_size, seed=seed, split=data.split,
                         config=data.config, synthetic=self.synthetic_prompts)
        encoded = []
        for i, row in enumerate(rows, 1):
            prompt = encoder.tokenizer.encode(row["prompt"], add_special_tokens=False).ids
            if not prompt or len(prompt) + self.max_new_tokens > length:
                raise TwintuneError(f"row {i} of {data.source}: its prompt is {len(prompt)} tokens, leaving no room for "
                                    f"task.max_new_tokens={self.max_new_tokens} within data.max_length={length}; "
                                    "raise data.max_length or shorten the prompt." if prompt else
                                    f"row {i} of {data.source} has an empty prompt.")
            encoder.check_method_fits(len(prompt) + self.max_new_tokens, len(prompt), f" row {i} of {data.source}")
            encoded.append(Encoded(np.array(prompt, np.int32), len(prompt), 0,
                                   columns={k: v for k, v in row.items() if k != "prompt"}))
        parts = random_splits(len(encoded), data.validation_fraction, data.test_fraction, seed, data.source, "prompts")
        return TaskData({split: [encoded[i] for i in idx] for split, idx in parts.items()})

    def evaluate(self, scorer, split: str):
        report = super().evaluate(scorer, split)
        return dataclasses.replace(report, unit="prompts", examples=len(scorer.rows(split)))
