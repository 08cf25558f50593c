"""The plan's surgeries, performed on an MLX model (the mirror of backends/torch/surgery.py).

Three kinds: WRAP puts a method's layer module (backends/mlx/methods/) around a linear layer;
UNFREEZE lets a base parameter train as it is; INSERT fills one of the model's empty slots (gpt_neo.py:
virtual tokens, prefixes, adapters after a sublayer, interventions on a block's output) with a
method's module. `undo_plan` takes a plan back off (switching adapters
on one loaded base). Nothing here knows a method by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from twintune.backends.mlx.methods import LAYERS
from twintune.dropout import dropout_stream
from twintune.errors import TwintuneError
from twintune.methods import INSERT, UNFREEZE, WRAP, BaseModel, Plan, Surgery


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The module at a dotted path such as 'transformer.h.0.mlp.c_fc' (torch's get_submodule)."""
    node = model
    for part in name.split(".") if name else ():
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(get_submodule(model, parent_name), attr, module)


def exact_array(values: np.ndarray) -> mx.array:
    """numpy -> MLX keeping float64 (mx.array alone rounds float64 to float32)."""
    return mx.array(values, dtype=mx.float64) if values.dtype == np.float64 else mx.array(values)


def apply_plan(model: nn.Module, plan: Plan, dtype: np.dtype) -> None:
    """Freeze the model, then perform each surgery with its initial values in `dtype` (the
    trainable dtype); only what the plan added or unfroze trains."""
    model.freeze()
    for surgery in plan.surgeries:
        values = {name: exact_array(np.asarray(v).astype(dtype)) for name, v in surgery.values.items()}
        if surgery.kind == WRAP:
            wrap(model, surgery, values)
        elif surgery.kind == UNFREEZE:
            unfreeze(model, surgery.target, values[surgery.target])
        elif surgery.kind == INSERT:
            insert(model, surgery, values)
        else:
            raise ValueError(f"surgery kind {surgery.kind!r} is not built on the MLX backend")
    mx.eval(model.parameters())


def wrap(model: nn.Module, surgery: Surgery, values: dict[str, mx.array]) -> None:
    """Put the surgery's layer module around the linear layer and give it its initial values."""
    base_layer = get_submodule(model, surgery.target)
    prefix = surgery.target + "."
    own = {name[len(prefix):]: value for name, value in values.items()}
    layer = LAYERS[type(surgery.layer)](base_layer, own, surgery.layer, dropout_stream(surgery.target))
    layer.update(tree_unflatten(list(own.items())))
    base_layer.freeze()
    set_submodule(model, surgery.target, layer)


def insert(model: nn.Module, surgery: Surgery, values: dict[str, mx.array]) -> None:
    """Fill the empty slot `surgery.target` with the surgery's module, given its initial values."""
    parent_name, _, attr = surgery.target.rpartition(".")  # "score": the model itself
    parent = get_submodule(model, parent_name)
    if not hasattr(parent, attr) or parent.get(attr) is not None:
        raise TwintuneError(f"this model has no free slot {surgery.target!r} for a {type(surgery.layer).__name__} "
                            "(slots are built into twintune's GPT-Neo).")
    prefix = surgery.target + "."
    own = {name[len(prefix):]: value for name, value in values.items()}
    module = LAYERS[type(surgery.layer)](own, surgery.layer, dropout_stream(surgery.target))
    module.update(tree_unflatten(list(own.items())))
    setattr(parent, attr, module)


def unfreeze(model: nn.Module, name: str, value: mx.array) -> None:
    """A base parameter trains from `value` (its own numbers), in the model's dtype: float32 or float64,
    or bfloat16 with its compensation beside it (optimizers.compensated_update)."""
    module_name, attr = name.rsplit(".", 1)
    module = get_submodule(model, module_name)
    module[attr] = value.astype(module[attr].dtype)
    module.unfreeze(recurse=False, keys=[attr])


@contextmanager
def base_view(model: nn.Module, plan: Plan, start: Mapping[str, mx.array]) -> Iterator[None]:
    """The base model for the duration: wrapped layers give way to their base layers, filled slots are
    empty, unfrozen parameters hold their start's values (`start`, which the caller keeps); all put
    back after. Nothing is copied: distillation's teacher is the model itself with the method off."""
    undo = []
    for surgery in plan.surgeries:
        if surgery.kind == UNFREEZE:
            module_name, attr = surgery.target.rsplit(".", 1)
            module = get_submodule(model, module_name)
            undo.append((module, attr, module[attr]))
            module[attr] = start[surgery.target]
        else:  # WRAP, INSERT
            module = get_submodule(model, surgery.target)
            undo.append((model, surgery.target, module))
            set_submodule(model, surgery.target, module.base_layer if surgery.kind == WRAP else None)
    try:
        yield
    finally:
        for owner, name, value in reversed(undo):
            if owner is model:
                set_submodule(model, name, value)
            else:
                owner[name] = value


def undo_plan(model: nn.Module, plan: Plan, base: BaseModel) -> None:
    """Reverse `apply_plan`: each wrapped layer becomes its `base_layer` again, each unfrozen
    parameter gets the base's own value back (in the model's dtype) and is frozen again, each
    filled slot is empty again.

    Example:
        >>> from mlx.utils import tree_flatten
        >>> from twintune.backends.mlx.backend import MLXBackend
        >>> from twintune.methods import LoRA
        >>> backend, plan = MLXBackend(spec, weights), LoRA(r=4).plan(base, seed=0)
        >>> apply_plan(backend.model, plan, np.float32); undo_plan(backend.model, plan, base)
        >>> tree_flatten(backend.model.trainable_parameters())
        []
    """
    for surgery in reversed(plan.surgeries):
        if surgery.kind == WRAP:
            set_submodule(model, surgery.target, get_submodule(model, surgery.target).base_layer)
        elif surgery.kind == UNFREEZE:
            refreeze(model, surgery.target, base)
        elif surgery.kind == INSERT:
            set_submodule(model, surgery.target, None)
        else:
            raise ValueError(f"surgery kind {surgery.kind!r} is not built on the MLX backend")
    mx.eval(model.parameters())


def refreeze(model: nn.Module, name: str, base: BaseModel) -> None:
    """A parameter that `unfreeze` let train holds the base's own value again (as the backend built
    it: the numpy weight in the model's dtype) and is frozen."""
    module_name, attr = name.rsplit(".", 1)
    module = get_submodule(model, module_name)
    module[attr] = mx.array(np.asarray(base.weights[name])).astype(getattr(mx, base.dtype))
    module.freeze(recurse=False, keys=[attr])
