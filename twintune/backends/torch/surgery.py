"""The plan's surgeries, performed on a torch model (the mirror of backends/mlx/surgery.py).

Three kinds: WRAP puts a method's layer module (backends/torch/methods/) around a linear layer;
UNFREEZE lets a base parameter train as it is; INSERT fills one of the model's empty slots
(gpt_neo.py: virtual tokens, prefixes, adapters after a sublayer, interventions on a block's output)
with a method's module. `undo_plan` takes a plan back off (switching
adapters on one loaded base). Nothing here knows a method by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from twintune.backends.torch.methods import LAYERS
from twintune.dropout import dropout_stream
from twintune.errors import TwintuneError
from twintune.methods import INSERT, UNFREEZE, WRAP, BaseModel, Plan, Surgery


def apply_plan(model: nn.Module, plan: Plan, dtype: np.dtype, device: torch.device) -> None:
    """Freeze the model, then perform each surgery with its initial values in `dtype` (the
    trainable dtype); only what the plan added or unfroze trains."""
    model.requires_grad_(False)
    for surgery in plan.surgeries:
        # Copies: the plan's arrays (and an unfrozen parameter's, the base's own weights) stay as planned.
        values = {name: torch.from_numpy(np.array(v, dtype=dtype, copy=True)).to(device)
                  for name, v in surgery.values.items()}
        if surgery.kind == WRAP:
            wrap(model, surgery, values)
        elif surgery.kind == UNFREEZE:
            unfreeze(model, surgery.target, values[surgery.target])
        elif surgery.kind == INSERT:
            insert(model, surgery, values)
        else:
            raise ValueError(f"surgery kind {surgery.kind!r} is not built on the torch backend")


def wrap(model: nn.Module, surgery: Surgery, values: dict[str, torch.Tensor]) -> None:
    """Put the surgery's layer module around the linear layer and give it its initial values."""
    parent_name, _, attr = surgery.target.rpartition(".")  # "score": the model itself
    parent = model.get_submodule(parent_name)
    base_layer = getattr(parent, attr)
    prefix = surgery.target + "."
    own = {name[len(prefix):]: value for name, value in values.items()}
    layer = LAYERS[type(surgery.layer)](base_layer, own, surgery.layer, dropout_stream(surgery.target))
    layer.load_state_dict(own, strict=False, assign=True)
    for name, parameter in layer.named_parameters():
        parameter.requires_grad_(name in own)
    setattr(parent, attr, layer)


def insert(model: nn.Module, surgery: Surgery, values: dict[str, torch.Tensor]) -> None:
    """Fill the empty slot `surgery.target` with the surgery's module, given its initial values."""
    parent_name, _, attr = surgery.target.rpartition(".")  # "score": the model itself
    parent = model.get_submodule(parent_name)
    if not hasattr(parent, attr) or getattr(parent, attr) is not None:
        raise TwintuneError(f"this model has no free slot {surgery.target!r} for a {type(surgery.layer).__name__} "
                            "(slots are built into twintune's GPT-Neo).")
    prefix = surgery.target + "."
    own = {name[len(prefix):]: value for name, value in values.items()}
    # Built on the meta device like a wrapped layer's parts: the initial values (already on `device`) become its parameters.
    module = LAYERS[type(surgery.layer)](own, surgery.layer, dropout_stream(surgery.target))
    module.load_state_dict(own, strict=False, assign=True)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(name in own)
    setattr(parent, attr, module)


def unfreeze(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """A base parameter trains from `value` (its own numbers), in the model's dtype: float32 or float64,
    or bfloat16 with its compensation beside it (optimizers.compensated_update)."""
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value.to(getattr(module, attr).dtype), requires_grad=True))


@contextmanager
def base_view(model: nn.Module, plan: Plan, start: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The base model for the duration: wrapped layers give way to their base layers, filled slots are
    empty, unfrozen parameters hold their start's values (`start`, which the caller keeps); all put
    back after. Nothing is copied: distillation's teacher is the model itself with the method off."""
    undo = []
    for surgery in plan.surgeries:
        parent_name, _, attr = surgery.target.rpartition(".")  # "score": the model itself
        parent = model.get_submodule(parent_name)
        if surgery.kind == UNFREEZE:
            parameter = getattr(parent, attr)
            undo.append((parameter, "data", parameter.data))
            parameter.data = start[surgery.target]
        else:  # WRAP, INSERT
            module = getattr(parent, attr)
            undo.append((parent, attr, module))
            setattr(parent, attr, module.base_layer if surgery.kind == WRAP else None)
    try:
        yield
    finally:
        for owner, attr, value in reversed(undo):
            setattr(owner, attr, value)


def undo_plan(model: nn.Module, plan: Plan, base: BaseModel) -> None:
    """Reverse `apply_plan`: each wrapped layer becomes its `base_layer` again, each unfrozen
    parameter gets the base's own value back (in the model's dtype) and is frozen again, each
    filled slot is empty again.

    Example:
        >>> from twintune.backends.torch.backend import TorchBackend
        >>> from twintune.methods import LoRA
        >>> backend, plan = TorchBackend(spec, weights), LoRA(r=4).plan(base, seed=0)
        >>> apply_plan(backend.model, plan, np.float32, backend.device); undo_plan(backend.model, plan, base)
        >>> [name for name, p in backend.model.named_parameters() if p.requires_grad]
        []
    """
    for surgery in reversed(plan.surgeries):
        if surgery.kind == WRAP:
            parent_name, _, attr = surgery.target.rpartition(".")  # "score": the model itself
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, getattr(parent, attr).base_layer)
        elif surgery.kind == UNFREEZE:
            refreeze(model, surgery.target, base)
        elif surgery.kind == INSERT:
            parent_name, _, attr = surgery.target.rpartition(".")  # "score": the model itself
            setattr(model.get_submodule(parent_name), attr, None)
        else:
            raise ValueError(f"surgery kind {surgery.kind!r} is not built on the torch backend")


def refreeze(model: nn.Module, name: str, base: BaseModel) -> None:
    """A parameter that `unfreeze` let train holds the base's own value again (a copy, in the
    model's dtype, on its device) and is frozen."""
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    device = getattr(module, attr).device
    value = torch.from_numpy(np.array(base.weights[name])).to(getattr(torch, base.dtype)).to(device)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))
