"""Dynamic loss scaling for float16 training, the rule torch.amp.GradScaler follows.

float16 stops at 65504 and rounds values below about 6e-8 to zero, so small gradients flowing
back through a float16 model vanish. The loss is multiplied by `scale` before the backward pass
and the gradients divided by it before the update. A step whose gradients overflowed is skipped
and the scale halved; after `growth_interval` good steps in a row it doubles again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossScaler:
    """Example:
        >>> scaler = LossScaler()
        >>> scaler.update(finite=False); scaler.scale
        32768.0
    """

    scale: float = 2.0**16
    growth_interval: int = 2000
    good_steps: int = 0

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale /= 2
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= 2
            self.good_steps = 0

    def state(self) -> dict:
        return asdict(self)
