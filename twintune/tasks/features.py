"""Features: no method trains; a logistic regression is fitted on the frozen model's pooled hidden
states, computed once per split and cached (the work is in train/features.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.tasks.task import Labelled, refuse_general_text


@dataclass(frozen=True)
class Features(Labelled):
    """A logistic regression on the frozen model's pooled hidden states (cached per split)."""

    pooling: str = "last"
    layer: int = -1
    l2: float = 1e-3

    name: ClassVar[str] = "features"
    description: ClassVar[str] = "logistic regression on the frozen model's pooled hidden states"
    trains_method: ClassVar[bool] = False

    @property
    def trains_in_steps(self) -> bool:
        return False

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        if recipe.method.name != "none":
            raise TwintuneError(f"task features trains no method (the model stays frozen; a classifier is fitted on "
                                f"its features), but the recipe names method {recipe.method.name}; remove the method "
                                "section or set method.name to none.")
        refuse_general_text(recipe, "does not train")

    def check_trains_something(self, recipe) -> None:
        """It fits a classifier on the frozen model's features: there is always something to train."""

    def shots_refusal(self) -> str:
        return ("--shots puts labelled sentences with their label words before each sentence, but this is a "
                "features run, whose classifier reads no label words; evaluate it without --shots")

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


