"""No method: the base model trains nothing of its own.

With `task: {name: classification, head: linear}` only the new head trains ("fine-tuning I", a
linear probe trained end to end through the loop); with `task: features` nothing trains through
the loop at all. Its adapter holds the head alone; its merge is the base with the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from twintune.methods.base import BaseModel, Method, Plan, dense_weights


@dataclass(frozen=True)
class NoMethod(Method):
    """The frozen base as it is.

    Example:
        >>> NoMethod().plan(base, seed=0).trainable_parameters()
        0
    """

    name: ClassVar[str] = "none"
    listed: ClassVar[int] = 11  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "no method"
    description: ClassVar[str] = "the base model trains nothing (with a linear head: the head alone)"

    def plan(self, base: BaseModel, seed: int) -> Plan:
        return Plan(self.name, ())

    def shapes(self, base: BaseModel) -> dict[str, tuple[int, ...]]:
        return {}

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dense_weights(base)
