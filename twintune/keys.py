"""Dataclasses from YAML values: each key checked by name and each value by its type hint.

Used by the recipe (recipe.py) and by every method's own keys (methods/): one set of rules
and one wording for a wrong key or value wherever it appears.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing

from twintune.errors import TwintuneError


def build(cls, raw, where: str, converters: dict | None = None):
    """An instance of dataclass `cls` from a mapping, refusing unknown keys and mistyped values.

    `where` prefixes key names in messages (e.g. "train."); `converters` maps a type to a
    function(value, key) for types this module does not know (the recipe's `method`).

    Example:
        >>> from twintune.recipe import TrainConfig
        >>> build(TrainConfig, {"lr": "1e-3"}, "train.").lr
        0.001
    """
    if not isinstance(raw, dict):
        raise TwintuneError(f"recipe section {where.rstrip('.') or 'top level'!r} must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else f"; known keys here: {', '.join(names)}."
            raise TwintuneError(f"recipe key '{where}{key}' is unknown{hint}")
        kwargs[key] = convert(hints[key], value, f"{where}{key}", converters)
    return cls(**kwargs)


def named_section(raw, registry: dict, where: str, kind: str, default: str, example: str, bare_name: bool = False,
                  hint: str = ""):
    """A recipe section that names one of `registry`'s dataclasses (`{name: NAME, its keys}`: a method, a
    task, an optimizer), built and validated: an unknown name gets a did-you-mean, a key that belongs
    to other entries is named as theirs. `bare_name`: a plain string is the name alone.

    Example:
        >>> from twintune.optimizers import OPTIMIZERS
        >>> named_section({"name": "sgd", "momentum": 0.9}, OPTIMIZERS, "train.optimizer", "optimizer", "adamw", "")
        SGD(momentum=0.9, dampening=0.0, nesterov=False)
    """
    if raw is None:
        raw = {}
    if bare_name and isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise TwintuneError(f"recipe key {where!r} must be a mapping such as {example}, got {raw!r}.")
    raw = dict(raw)
    name = raw.pop("name", default)
    if name not in registry:
        close = difflib.get_close_matches(str(name), registry, n=1)
        did_you_mean = f"; did you mean {close[0]!r}?" if close else ""
        raise TwintuneError(f"recipe key '{where}.name' names no {kind}: {name!r}{did_you_mean} "
                            f"({kind}s: {', '.join(registry)}{hint}).")
    cls = registry[name]
    own = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        owners = [n for n, other in registry.items() if key in [f.name for f in dataclasses.fields(other)]]
        if key not in own and owners:
            them = f"{kind} {owners[0]}" if len(owners) == 1 else \
                f"{kind}s {', '.join(owners[:-1])} and {owners[-1]}"
            raise TwintuneError(f"recipe key '{where}.{key}' belongs to {them}, not to {name}; {name}'s keys are: "
                                f"{', '.join(own) or 'none'}.")
    section = build(cls, raw, f"{where}.")
    section.validate()
    return section


def convert(kind, value, key: str, converters: dict | None = None):
    """`value` as type `kind`, or a sentence naming `key` and what it must be."""
    if converters and kind in converters:
        return converters[kind](value, key)
    if dataclasses.is_dataclass(kind):
        return build(kind, value or {}, key + ".", converters)
    origin = typing.get_origin(kind)
    if kind is type(None):
        if value is not None:
            raise TwintuneError(f"recipe key {key!r} must be null, got {value!r}.")
        return None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if type(None) in options and len(options) == 2:  # optional: null, or the other type's value
            other = next(o for o in options if o is not type(None))
            return None if value is None else convert(other, value, key, converters)
        for option in options:
            try:
                return convert(option, value, key, converters)
            except TwintuneError:
                continue
        raise TwintuneError(f"recipe key {key!r} must be a list of names or a regex string, got {value!r}.")
    if origin in (list, tuple):
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            raise TwintuneError(f"recipe key {key!r} must be a list, got {value!r}.")
        return [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TwintuneError(f"recipe key {key!r} must map names to values, got {value!r}.")
        return {k: convert(item, v, f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise TwintuneError(f"recipe key {key!r} must be true or false, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TwintuneError(f"recipe key {key!r} must be a whole number, got {value!r}.")
        return value
    if kind is float:
        # YAML reads 1e-3 (no dot) as a string; accept any number spelled as text.
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise TwintuneError(f"recipe key {key!r} must be a number, got {value!r}.") from None
        if not math.isfinite(number):
            raise TwintuneError(f"recipe key {key!r} must be a finite number, got {value!r}.")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise TwintuneError(f"recipe key {key!r} must be text, got {value!r}.")
        return value
    raise AssertionError(f"unhandled recipe type {kind}")


def check(ok: bool, message: str) -> None:
    """Raise `message` as the user's error unless `ok`."""
    if not ok:
        raise TwintuneError(message)
