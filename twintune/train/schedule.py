"""Learning-rate schedules, as Hugging Face's get_*_schedule_with_warmup compute them."""

from __future__ import annotations

import math


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int, kind: str) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warmup rises linearly from 0; then `constant` holds, `linear` decays to 0 at the last
    step, `cosine` follows half a cosine to 0.

    Example:
        >>> learning_rate(0, 1e-3, total_steps=100, warmup_steps=0, kind="linear")
        0.001
    """
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    if kind == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    if kind == "cosine":
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {kind!r}")
