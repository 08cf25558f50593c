"""Backend selection: `auto` picks MLX on Apple Silicon, torch elsewhere (CUDA when present)."""

from __future__ import annotations

import importlib.util
import platform
import sys

from twintune.backends.base import CAPABILITIES, Capabilities
from twintune.errors import TwintuneError

BACKENDS = ("auto", "mlx", "torch")
def capabilities(name: str) -> Capabilities:
    """What the backend `name` (auto resolved) can do.

    Example:
        >>> capabilities("torch").sharding, capabilities("mlx").launcher
        (True, 'mlx.launch')
    """
    return CAPABILITIES[resolve_backend_name(name)]


def resolve_backend_name(name: str) -> str:
    """The concrete backend for a name; `auto` decides by the machine.

    Example:
        >>> resolve_backend_name("torch")   # "auto": mlx on a MacBook with Apple Silicon, else torch
        'torch'
    """
    if name not in BACKENDS:
        raise TwintuneError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name != "auto":
        return name
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple_silicon and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    if importlib.util.find_spec("mlx") is not None:
        return "mlx"
    raise TwintuneError("no backend is installed; pip install 'twintune[mlx]' or 'twintune[torch]'.")


def backend_class(name: str):
    """The Backend class for a concrete name, with a clear error if its framework is missing."""
    name = resolve_backend_name(name)
    modules = {"mlx": ("mlx",), "torch": ("torch", "transformers")}[name]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise TwintuneError(f"the {name} backend needs the package {module!r}; pip install 'twintune[{name}]'.")
    if name == "mlx":
        from twintune.backends.mlx.backend import MLXBackend

        return MLXBackend
    from twintune.backends.torch.backend import TorchBackend

    return TorchBackend
