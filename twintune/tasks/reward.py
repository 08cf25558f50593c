"""A reward model: a scalar head on the last token (transformers' sequence classifier with one label,
`score`), trained on preference pairs to score the chosen answer above the rejected one.

Bradley-Terry, as TRL's RewardTrainer: per pair `-log σ(s_c - s_r - m)`, m the pair's `margin` column
where the data has one (TRL's name; 0 otherwise), plus, with
`center_rewards_coefficient` c > 0, `c (s_c + s_r)²`, which keeps the scores centred on zero (TRL
recommends 0.01). Scored by reward accuracy (the share of held-out pairs whose chosen answer scores
higher), the mean margin `s_c - s_r` and the mean reward.

The head is the classification head's surgery with one row; it saves as PEFT's SEQ_CLS with
`num_labels: 1` (the head in `modules_to_save`), and its one "label" is `reward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.data.batching import Batch, Encoded, Encoder
from twintune.keys import check
from twintune.methods.base import Surgery
from twintune.tasks.classification import head_surgery
from twintune.tasks.objectives import Objective, Ops, row_sums
from twintune.tasks.preference import SAME_ANSWERS, PairTask

REWARD_LABELS = ["reward"]


@dataclass(frozen=True)
class BradleyTerry(Objective):
    """The reward model's loss over pairs of rows, each scored at its one target (its last token)."""

    center_rewards_coefficient: float = 0.0

    reads: ClassVar[str] = "scores"
    figures: ClassVar[tuple[str, ...]] = ("accuracy", "margin", "mean_reward")

    def loss(self, ops: Ops, values, batch: Batch) -> tuple[object, list]:
        scores = row_sums(ops, values, batch)
        chosen, rejected = scores[0::2], scores[1::2]
        margin = batch.row_data.get("margin")  # per row, the pair's: read from its chosen row
        losses = -ops.log_sigmoid(chosen - rejected if margin is None else chosen - rejected - ops.array(margin[0::2]))
        if self.center_rewards_coefficient:
            total = chosen + rejected
            losses = losses + self.center_rewards_coefficient * (total * total)
        return losses.sum(), [(chosen > rejected).sum(), (chosen - rejected).sum(), ((chosen + rejected) / 2).sum()]


@dataclass(frozen=True)
class Reward(PairTask):
    """Train a reward model (a one-output head, with the recipe's method or alone) on preference pairs."""

    center_rewards_coefficient: float = 0.0

    number_columns: ClassVar[tuple[str, ...]] = ("margin",)
    cannot_predict: ClassVar[str | None] = ("it scores an answer to a prompt with one number, not with labels; "
                                            "evaluate its reward accuracy on held-out pairs with twintune eval")

    name: ClassVar[str] = "reward"
    description: ClassVar[str] = "a reward model: a scalar head trained on prompt/chosen/rejected pairs (Bradley-Terry)"
    metrics: ClassVar[tuple[str, ...]] = ("val_accuracy", "val_loss", "val_margin")
    no_gradient: ClassVar[str] = SAME_ANSWERS

    def validate(self) -> None:
        check(self.center_rewards_coefficient >= 0, "recipe key 'task.center_rewards_coefficient' must be 0 or more, "
              f"got {self.center_rewards_coefficient}.")

    @property
    def linear_head(self) -> bool:
        return True

    def head_labels(self, recipe) -> list[str]:
        return REWARD_LABELS

    def check_trains_something(self, recipe) -> None:
        """The head always trains: `method: none` trains it alone."""

    def surgeries(self, spec, labels: int, seed: int) -> tuple[Surgery, ...]:
        return (head_surgery(1, spec.hidden_size, seed),)

    @property
    def objective(self) -> BradleyTerry:
        return BradleyTerry(self.center_rewards_coefficient)

    def encode_pair(self, row: dict, encoder: Encoder, length: int, where: str) -> Encoded:
        """The pair, with its `margin` on both rows when the data has one."""
        pair = super().encode_pair(row, encoder, length, where)
        if "margin" in row:
            pair.row_data = pair.rejected.row_data = {"margin": row["margin"]}
        return pair

    def encode_row(self, prompt: list[int], completion: list[int], encoder: Encoder, length: int, where: str) -> Encoded:
        """The whole row is the "prompt": its one target is the head's score at its last token."""
        row = super().encode_row(prompt, completion, encoder, length, where)
        return Encoded(row.ids, len(row.ids), 0, class_target=True)

