"""The layer modules a plan's WRAP and INSERT surgeries build on MLX, by the class of a surgery's
`layer`: each file of backends/mlx/methods/ registers its own with `@builds(TheLayer)`."""

from __future__ import annotations

from twintune.methods.base import Layer

LAYERS: dict[type[Layer], type] = {}


def builds(layer: type[Layer]):
    """Register the decorated class as the module that builds `layer` (a surgery's Layer subclass)."""
    def register(cls: type) -> type:
        LAYERS[layer] = cls
        return cls
    return register
