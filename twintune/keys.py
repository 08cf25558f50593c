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
