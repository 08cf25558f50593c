"""Features: no method trains; a logistic regression is fitted on the frozen model's pooled hidden
states, computed once per split and cached (the work is in train/features.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.keys import check
from twintune.tasks.task import Task


@dataclass(frozen=True)
class Features(Task):
    """A logistic regression on the frozen model's pooled hidden states (cached per split)."""

    pooling: str = "last"
    layer: int = -1
    l2: float = 1e-3

    name: ClassVar[str] = "features"
    description: ClassVar[str] = "logistic regression on the frozen model's pooled hidden states"

    @property
    def trains_in_steps(self) -> bool:
        return False

    def validate(self) -> None:
        check(self.pooling in ("last", "mean"), f"recipe key 'task.pooling' must be last or mean, got {self.pooling!r}.")
        check(self.l2 >= 0, f"recipe key 'task.l2' must be >= 0, got {self.l2}.")

    def check_layer(self, num_layers: int) -> int:
        """The hidden-state index `layer` names for a model of `num_layers` blocks (0..num_layers)."""
        index = self.layer + num_layers + 1 if self.layer < 0 else self.layer
        check(0 <= index <= num_layers,
              f"recipe key 'task.layer' must be between {-num_layers - 1} and {num_layers} for this model of "
              f"{num_layers} blocks (0: the embeddings, i: block i's output, -1: the final states), got {self.layer}.")
        return index


