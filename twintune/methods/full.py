"""Full fine-tuning: every parameter trains (the tied token embedding / output layer once).

The result is a whole Hugging Face checkpoint, not an adapter. AdamW keeps two values per
parameter, so training takes about four times the model's float32 size before activations
(`twintune estimate` says how much).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.methods.base import BaseModel, Comparison, Unfreezing


@dataclass(frozen=True)
class Full(Unfreezing):
    """Train every weight of the base model.

    Example:
        >>> Full().plan(base, seed=0).trainable_parameters() == sum(w.size for w in base.weights.values())
        True
    """

    name: ClassVar[str] = "full"
    listed: ClassVar[int] = 5  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "full fine-tuning"
    description: ClassVar[str] = "every parameter trains; the result is a whole Hugging Face checkpoint"
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("full", "full", {}, 1e-3),
    )
    layout: ClassVar[str] = "checkpoint"

    def parameters(self, base: BaseModel) -> list[str]:
        return list(base.spec.weight_shapes())
