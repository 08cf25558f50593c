"""What GRPO and PPO share: prompts to sample completions for, a reward for each completion (a
`python:module.function` in TRL's signature, or a reward run's head), and the sampling keys.

Completions are sampled with the KV cache at `temperature` and `top_p` from numpy's generator seeded
by (the seed a step hands the task, the prompt, the sample), so both backends sample the same tokens
and a resumed run samples what the uninterrupted one did; a completion ends with end-of-text (kept,
as a target) or after `max_new_tokens`. `source: synthetic` gives openings of synthetic sentences to
continue (`synthetic_prompts: openings`) or the preference pairs' sentiment questions with the right
answer as a `label` column (`questions`).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from twintune.data.batching import Batch, Encoded, Encoder
from twintune.data.documents import random_splits
from twintune.data.preferences import PROMPTS, load_rows
from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.tasks.objectives import ModelAccess
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


@dataclass
class Sampled:
    """A micro-batch's prompts with their sampled completions: `rows` (prompt + completion, the
    completion's tokens the targets), in prompt order, `per_prompt` rows each."""

    rows: list[Encoded]
    prompts: list[str]  # each prompt's text
    columns: list[dict]  # each prompt's other columns
    per_prompt: int


@dataclass(frozen=True)
class SamplingTask(PairTask):
    """A task that samples completions of prompts and scores them with a reward (GRPO, PPO)."""

    reward: str = ""
    reward_model: str = ""
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    synthetic_prompts: str = "openings"  # data.source synthetic: openings to continue | questions (the pairs')

    cannot_predict: ClassVar[str | None] = ("it generates completions for a reward, not labels; evaluate its reward "
                                            "with twintune eval, or generate with twintune generate")
    rows_per_example: ClassVar[int] = 1

    def validate(self) -> None:
        check(bool(self.reward) != bool(self.reward_model),
              f"task {self.name} needs one reward: a function as task.reward: python:module.function (e.g. "
              "python:twintune.rewards.upbeat), or a reward run as task.reward_model: RUN" +
              ("; it has both." if self.reward else "."))
        if self.reward:
            reward_function(self.reward)
        check(self.max_new_tokens >= 1, f"recipe key 'task.max_new_tokens' must be 1 or more, got {self.max_new_tokens}.")
        check(self.temperature > 0, f"recipe key 'task.temperature' must be above 0 ({self.name} samples), got "
                                    f"{self.temperature}.")
        check(0 < self.top_p <= 1, f"recipe key 'task.top_p' must be in (0, 1], got {self.top_p}.")
        check(self.synthetic_prompts in ("openings", "questions"), "recipe key 'task.synthetic_prompts' must be "
              f"openings or questions, got {self.synthetic_prompts!r}.")

    def data(self, data, seed: int, encoder: Encoder, length: int) -> TaskData:
        rows = load_rows(data.source, PROMPTS, synthetic_size=data.synthetic_size, seed=seed, split=data.split,
                         config=data.config, synthetic=self.synthetic_prompts, chat=encoder.chat)
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
                                   columns={k: v for k, v in row.items() if k not in ("prompt", "conversational")}))
        parts = random_splits(len(encoded), data.validation_fraction, data.test_fraction, seed, data.source, "prompts")
        return TaskData({split: [encoded[i] for i in idx] for split, idx in parts.items()})

    def sample(self, batch: Batch, model: ModelAccess, seed: int, per_prompt: int) -> Sampled:
        """`per_prompt` completions of each of a batch's prompts, each drawn from numpy's generator
        seeded by (seed, prompt, sample): a stable number anywhere (not Python's hash()). Prompts of one
        length are sampled together (one forward a token for all, no padding), in the order their
        lengths first appear."""
        prompts = [batch.input_ids[j, :batch.lengths[j]].tolist() for j in range(batch.input_ids.shape[0])]
        draws = {(j, k): int(np.random.SeedSequence([seed, j, k]).generate_state(1, np.uint64)[0])
                 for j in range(len(prompts)) for k in range(per_prompt)}
        completions = {}
        for length in dict.fromkeys(len(p) for p in prompts):
            mine = [(j, k) for (j, k) in draws if len(prompts[j]) == length]
            found = model.sample([prompts[j] for j, _ in mine], self.max_new_tokens, self.temperature, self.top_p,
                                 seeds=[draws[key] for key in mine])
            completions.update(zip(mine, found))
        rows = [Encoded(np.array(prompts[j] + completions[j, k], np.int32), len(prompts[j]), 0) for j, k in draws]
        columns = [(batch.columns or [None] * len(prompts))[j] or {} for j in range(len(prompts))]
        return Sampled(rows, [model.decode(p) for p in prompts], columns, per_prompt)

    def rewards(self, sampled: Sampled, model: ModelAccess) -> np.ndarray:
        """(rows,) each completion's reward: the reward function's (given the prompts, the completions'
        texts and the prompts' other columns), or the reward model's score of prompt + completion at
        its last token."""
        if not self.reward:
            return model.reward_scores([row.ids.tolist() for row in sampled.rows])
        n = sampled.per_prompt
        texts = [model.decode(row.ids[row.prompt_len:].tolist()) for row in sampled.rows]
        prompts = [p for p in sampled.prompts for _ in range(n)]
        columns = [c for c in sampled.columns for _ in range(n)]
        keys = sorted({key for c in columns for key in c if key != "prompt"})
        try:
            given = reward_function(self.reward)(prompts, texts, **{key: [c.get(key) for c in columns] for key in keys})
        except TwintuneError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's function: its failure as one sentence
            first = (str(error).strip().splitlines() or [""])[0]
            raise TwintuneError(f"task.reward {self.reward} raised {type(error).__name__} ({first}) when called as "
                                f"f(prompts, completions, {', '.join(f'{k}=...' for k in keys) or '**columns'}).") from None
        try:
            values = np.asarray(given, np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.shape != (len(texts),) or not np.isfinite(values).all():
            raise TwintuneError(f"task.reward {self.reward} must return one finite number for each of the "
                                f"{len(texts)} completions it is given; it returned {_shape(given)}.")
        return values

    def evaluate(self, scorer, split: str):
        report = super().evaluate(scorer, split)
        return dataclasses.replace(report, unit="prompts", examples=len(scorer.rows(split)))


def _shape(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]
