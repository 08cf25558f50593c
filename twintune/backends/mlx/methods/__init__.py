"""Method layer modules for MLX, by the name a plan's WRAP or INSERT surgery gives (mirrors
backends/torch/methods/). Every module of this package is imported here, and each registers its
layers (registry.py), so a new method's layer is its file alone."""

import importlib
import pkgutil

from twintune.backends.mlx.methods.registry import LAYERS, builds

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LAYERS", "builds"]
