"""The fine-tuning methods: one backend-neutral file each, all with the same interface (base.py).

A recipe's `method: {name: X, ...}` becomes the method's dataclass here; its plan is what the
backends perform. Adding a method is adding its file here (every Method subclass with a `name` in
this package is found: METHODS), and for a new kind of layer a mirrored module in each
backends/{mlx,torch}/methods/.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from twintune.keys import named_section
from twintune.methods.base import INSERT, UNFREEZE, WRAP, BaseModel, Method, Plan, Surgery
from twintune.methods.bitfit import BitFit
from twintune.methods.dora import DoRA
from twintune.methods.full import Full
from twintune.methods.ia3 import IA3
from twintune.methods.last_blocks import LastBlocks
from twintune.methods.lora import LoRA, adapted_layers
from twintune.methods.adapter import BottleneckAdapter
from twintune.methods.prompt import PTuning, PromptTuning
from twintune.methods.prefix import Prefix
from twintune.methods.loreft import LoReFT
from twintune.methods.none import NoMethod


def _discover() -> dict[str, type[Method]]:
    """Every method class in this package's modules, by name, in their `listed` order."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        for value in vars(importlib.import_module(f"{__name__}.{module.name}")).values():
            if isinstance(value, type) and issubclass(value, Method) and "name" in vars(value):
                found[value.name] = value
    return dict(sorted(found.items(), key=lambda item: (item[1].listed, item[0])))


METHODS: dict[str, type[Method]] = _discover()

__all__ = ["METHODS", "BaseModel", "Method", "Plan", "Surgery", "INSERT", "UNFREEZE", "WRAP", "LoRA", "DoRA", "IA3", "BitFit",
           "LastBlocks", "Full", "BottleneckAdapter", "PromptTuning", "PTuning", "Prefix", "LoReFT", "NoMethod",
           "adapted_layers", "method_from_dict", "method_keys"]


def method_keys(cls: type[Method]) -> dict:
    """A method's recipe keys and their defaults."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def method_from_dict(raw, where: str = "method") -> Method:
    """The method a recipe's `method:` section names, its keys checked by name and value.

    Example:
        >>> method_from_dict({"name": "dora", "r": 4})
        DoRA(r=4, alpha=16.0, dropout=0.0, target_modules=('q_proj', 'v_proj'), ...)
    """
    return named_section(raw, METHODS, where, "method", "lora", "{name: lora, r: 8}",
                         hint="; `twintune methods` lists their keys")


def describe_methods() -> str:
    """Every method with its one-line description and its keys' defaults (`twintune methods`)."""
    lines = []
    for name, cls in METHODS.items():
        lines.append(f"{name:12s} {cls.description}")
        for key, default in method_keys(cls).items():
            shown = list(default) if isinstance(default, tuple) else default
            lines.append(f"{'':14s}{key}: {shown}")
    return "\n".join(lines)
