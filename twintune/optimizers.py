"""The optimizers a recipe chooses (`train.optimizer: {name: ..., its keys}`), each written once.

An optimizer here is a description and an update rule: its keys and defaults (the reference's), the
state it keeps per trainable value (names, shapes, 8-bit or float), and `update`, the arithmetic of
one step on one value, written on arrays through a handful of `ArrayOps` (backends/X/optimizer.py
gives torch's and MLX's). So both backends run one algorithm with the same operations in the same
order: float64 agrees to rounding, and given the same gradients the 8-bit codes are the same bytes.

| name | state per value | reference |
|---|---|---|
| adamw | 8 B (m, v) | torch.optim.AdamW |
| adamw8bit | ~2 B: m and v as 8-bit codes, one float32 absmax per 256 | bitsandbytes AdamW8bit |
| paged_adamw, paged_adamw8bit | as adamw, adamw8bit, in CUDA's paged memory | bitsandbytes Paged* |
| lion, lion8bit | 4 B / ~1 B (m) | mlx.optimizers.Lion, bitsandbytes Lion8bit |
| sgd | 0 B, 4 B with momentum | torch.optim.SGD |
| adafactor | rows + columns of each matrix | transformers.Adafactor |

The 8-bit state is bitsandbytes' blockwise dynamic quantization: a block of 256 values is divided
by its largest magnitude and each quotient stored as the index of the nearest of 256 values of the
dynamic map (signed for m, unsigned for v); tensors under `min_8bit_size` values keep float32
state, as bitsandbytes does.

The learning rate a backend passes is train.lr through the schedule (and a method's lr scale);
Adafactor with `relative_step` computes its own from the step and the value's size instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check, named_section

BLOCK = 256  # values per absmax of the 8-bit state (bitsandbytes' blockwise optimizers)


class ArrayOps(Protocol):
    """What an update computes with, on one framework's arrays (backends/X/optimizer.py)."""

    def sqrt(self, x): ...
    def sign(self, x): ...
    def abs(self, x): ...
    def where(self, condition, x, y):
        """x where condition, else y (either may be a Python number)."""
    def clamp_min(self, x, low: float): ...
    def mean(self, x, axis: int):
        """The mean over one axis (dropped)."""
    def amax(self, x, axis: int):
        """The largest value over one axis (dropped)."""
    def rms(self, x):
        """sqrt(mean(x²)) over every element, as a 0-d array (transformers' `norm(2) / sqrt(numel)`)."""
    def blocks(self, x):
        """The flat `x` as (blocks, BLOCK) rows, the last zero-padded."""
    def unblock(self, x, size: int):
        """(blocks, BLOCK) rows as the flat first `size` values."""
    def table(self, values: np.ndarray):
        """A constant float32 numpy table as an array of the framework."""
    def take(self, table, indices):
        """table[indices], elementwise (indices: an integer array)."""
    def bits(self, x):
        """The float32 array's bits as int32 (a view, not a conversion)."""
    def as_codes(self, indices):
        """Indices 0-255 as uint8."""
    def float32(self, x):
        """x as float32 (exact from bfloat16)."""
    def like(self, x, other):
        """The float32 x in other's dtype, each rounded to the nearest (ties to even: torch and MLX alike)."""


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed)` (7 exponent bits, 8 bits in all): 256 sorted float32
    values, dense near zero. Computed in float64 and rounded once; bitsandbytes' own (torch's CPU
    linspace in float32, whose rounding depends on the CPU's vector width) differs from it by at most
    one float32 unit in a few values (tests/test_optimizers.py)."""
    values = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)
        values += list(means) + (list(-means) if signed else [])
    values += [0.0, 1.0]
    return np.sort(np.array(values, np.float32))


SIGNED, UNSIGNED = dynamic_map(True), dynamic_map(False)


def midpoints(code: np.ndarray) -> np.ndarray:
    """(255,) float32: the halfway points between neighbouring code values, where rounding to the
    nearest switches (computed in float32, as bitsandbytes' CUDA kernel does)."""
    return ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)


def quantize(ops: ArrayOps, x, code: np.ndarray):
    """(codes uint8, absmax float32 per block) of the flat float32 `x`: each value divided by its
    block's absmax (divided, not multiplied by the reciprocal, as bitsandbytes' kernels do), then the
    index of the nearest code value: the count of midpoints below it, comparisons only, so the same
    integers on every framework. An all-zero block stores zeros."""
    rows = ops.blocks(x)
    absmax = ops.amax(ops.abs(rows), 1)
    normed = ops.unblock(rows / ops.where(absmax > 0, absmax, 1.0)[:, None], x.shape[0])
    return ops.as_codes(nearest(ops, normed, code)), absmax


def nearest(ops: ArrayOps, x, code: np.ndarray):
    """The index of the code value nearest each of `x` (in [-1, 1]): the count of midpoints below it.
    A binary search branches on every value (17 ms a million here, torch's bucketize); instead the top
    16 bits of each value's ordered bit pattern pick a bucket, whose first count a table holds, and
    `extra` comparisons with the next midpoints finish it (1 for these maps: no bucket holds two).
    Integer and comparison operations only: the same indices on every framework, equal to numpy's
    searchsorted (tests/test_optimizers.py)."""
    first, bounds, extra = _bucket_tables(code.tobytes())
    bits = ops.bits(x)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order = float order (negatives' magnitude bits flipped)
    index = ops.take(ops.table(first), (ordered >> 16) + 32768)
    for _ in range(extra):
        index = ops.where(x > ops.take(ops.table(bounds), index), index + 1, index)
    return index


@functools.lru_cache(maxsize=4)
def _bucket_tables(code_bytes: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """For each of the 65536 buckets of ordered float32 bit patterns (their top 16 bits): how many
    midpoints lie below its lowest value; the midpoints with `extra` +inf after them; and `extra`,
    the most midpoints one (finite) bucket holds."""
    bounds = midpoints(np.frombuffer(code_bytes, np.float32))
    keys = (np.arange(65536, dtype=np.int64) - 32768) << 16

    def as_float(ordered: np.ndarray) -> np.ndarray:
        ordered = ordered.astype(np.int32)
        return np.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).astype(np.int32).view(np.float32)

    lowest, highest = as_float(keys), as_float(keys | 0xFFFF)
    first = np.searchsorted(bounds, lowest, side="left").astype(np.int32)
    finite = np.isfinite(lowest) & np.isfinite(highest)
    extra = int((np.searchsorted(bounds, highest, side="right") - first)[finite].max())
    return first, np.concatenate([bounds, np.full(extra, np.inf, np.float32)]), extra


def dequantize(ops: ArrayOps, codes, absmax, code: np.ndarray):
    """The float32 values the codes stand for: the code value times the block's absmax."""
    return ops.unblock(ops.blocks(ops.take(ops.table(code), codes)) * absmax[:, None], codes.shape[0])


def state_pieces(state: dict, size: int, start: int, stop: int) -> dict:
    """Values start..stop of a flat value's flat state arrays (any framework's): a per-value array's
    own slice, a per-block array's blocks (start and stop on BLOCK boundaries, but for the value's end)."""
    return {key: value[start:stop] if value.shape[0] == size else value[start // BLOCK: -(-stop // BLOCK)]
            for key, value in state.items()}


COMPENSATION = "compensation"


def compensated_update(optimizer: Optimizer, ops: ArrayOps, p, g, state: dict, step: int, lr: float,
                       weight_decay: float) -> tuple:
    """`optimizer.update` on a value, also where it is held in bfloat16 (full fine-tuning of a bfloat16
    model): there the value is two bfloat16 halves, the model's `p` and its compensation (what rounding
    to bfloat16 dropped, Kahan's compensated summation), ~16 significant bits together. The step runs
    in float32 on their sum; the result is rounded into `p` and what that rounding dropped is the new
    compensation. Without it, an update under half a bfloat16 unit of its value (2^-9 of it: lr 1e-5
    against weights of 0.02) would be rounded away, every step. 2 bytes a value, where float32 master
    weights take 4 beside the bfloat16 copy.

    Example (8 steps of 1e-3 from 1.0: each alone rounds away in bfloat16, whose unit below 1 is 2^-8):
        >>> import torch
        >>> from twintune.backends.torch.optimizer import TorchArrayOps
        >>> p, g = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16)
        >>> state = {COMPENSATION: torch.zeros(2, dtype=torch.bfloat16)}
        >>> for step in range(1, 9):
        ...     p, state = compensated_update(SGD(), TorchArrayOps(p.device), p, g, state, step, 1e-3, 0.0)
        >>> p[0].item(), (p.float() + state[COMPENSATION].float())[0].item()   # without it p stays 1.0
        (0.9921875, 0.9920034...)
    """
    if COMPENSATION not in state:
        return optimizer.update(ops, p, g, state, step, lr, weight_decay)
    own = {key: value for key, value in state.items() if key != COMPENSATION}
    value = ops.float32(p) + ops.float32(state[COMPENSATION])  # exact: the halves' bits do not overlap
    new_value, new = optimizer.update(ops, value, ops.float32(g), own, step, lr, weight_decay)
    rounded = ops.like(new_value, p)
    new[COMPENSATION] = ops.like(new_value - ops.float32(rounded), p)  # the difference is exact in float32
    return rounded, new


@dataclass(frozen=True)
class State:
    """One array an optimizer keeps per trainable value: its shape and kind ("float": the run's
    precise dtype; "float32"; "codes": uint8; "value": the value's own dtype)."""

    shape: tuple[int, ...]
    kind: str = "float"

    def bytes(self, float_bytes: int, value_bytes: int | None = None) -> int:
        size = math.prod(self.shape)
        return size * {"float": float_bytes, "float32": 4, "codes": 1, "value": value_bytes or float_bytes}[self.kind]


@dataclass(frozen=True)
class Optimizer:
    """An optimizer's keys (its dataclass fields) and its step; the base of every optimizer here."""

    name: ClassVar[str]
    description: ClassVar[str]
    eight_bit: ClassVar[bool] = False
    paged: ClassVar[bool] = False  # state in CUDA's paged (unified) memory: torch on CUDA only
    elementwise: ClassVar[bool] = True  # its state is per value or per block: a backend may update in chunks

    def validate(self) -> None:
        """Refuse a bad value of one of its keys, by a sentence naming it."""

    def states(self, shape: tuple[int, ...]) -> dict[str, State]:
        """The state it keeps for a trainable value of this shape, by name (a checkpoint saves
        `NAME.value_name` for each, and `step`)."""
        raise NotImplementedError

    def update(self, ops: ArrayOps, p, g, state: dict, step: int, lr: float, weight_decay: float) -> tuple:
        """(the new value, the new state) after one step on value `p` with gradient `g` (both flat
        arrays where the optimizer is elementwise), `step` counting from 1."""
        raise NotImplementedError

    def learning_rate(self, scheduled: float, step: int) -> float:
        """The learning rate a run logs at `step` (from 1): the schedule's, unless it computes its own."""
        return scheduled

    def value_states(self, shape: tuple[int, ...], low_precision: bool = False) -> dict[str, State]:
        """What a run keeps for one trainable value: `states`, and for a value held in bfloat16 its
        compensation (compensated_update), in the value's own dtype."""
        states = self.states(shape)
        return {**states, COMPENSATION: State(shape, "value")} if low_precision else states

    def state_bytes(self, shape: tuple[int, ...], float_bytes: int = 4, value_bytes: int | None = None) -> int:
        """Bytes of what a run keeps for a value of this shape (`value_bytes`: the value's own dtype's,
        when it is held in lower precision than `float_bytes`)."""
        low = value_bytes is not None and value_bytes < float_bytes
        return sum(state.bytes(float_bytes, value_bytes) for state in self.value_states(shape, low).values())

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


def _betas(key: str, betas) -> None:
    check(len(betas) == 2 and all(0 <= b < 1 for b in betas),
          f"recipe key 'train.optimizer.{key}' must be two numbers in [0, 1), got {list(betas)}.")


@dataclass(frozen=True)
class AdamW(Optimizer):
    """torch.optim.AdamW: bias-corrected moments, decoupled weight decay (MLX's own AdamW defaults to
    no bias correction; this one keeps it on both backends)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    name: ClassVar[str] = "adamw"
    description: ClassVar[str] = "AdamW as torch computes it: 8 bytes of state per value"

    def validate(self) -> None:
        _betas("betas", self.betas)
        check(self.eps > 0, f"recipe key 'train.optimizer.eps' must be above 0, got {self.eps}.")

    def states(self, shape):
        return {"m": State(shape), "v": State(shape)}

    def update(self, ops, p, g, state, step, lr, weight_decay):
        p, m, v = adamw_update(p, g, state["m"], state["v"], step, lr, self.betas, self.eps, weight_decay, ops.sqrt)
        return p, {"m": m, "v": v}


def adamw_update(p, g, m, v, step: int, lr: float, betas, eps: float, weight_decay: float, sqrt):
    """AdamW as torch.optim.AdamW computes it, written once for both backends' arrays.

    Decoupled weight decay first, then bias-corrected moments with epsilon added to
    sqrt(v_hat); the same order of operations as torch, so the two backends round alike.
    (mlx.optimizers.AdamW defaults differ: no bias correction, weight decay 0.01.)
    """
    b1, b2 = betas
    if weight_decay:  # a product with 1.0 changes no bit: skipped, a pass over every value fewer
        p = p * (1.0 - lr * weight_decay)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * (g * g)
    denom = sqrt(v) / ((1.0 - b2**step) ** 0.5) + eps
    p = p - (lr / (1.0 - b1**step)) * (m / denom)
    return p, m, v


@dataclass(frozen=True)
class AdamW8bit(AdamW):
    """bitsandbytes' AdamW8bit: AdamW with m and v kept as 8-bit codes (blockwise, dynamic map)."""

    min_8bit_size: int = 4096

    name: ClassVar[str] = "adamw8bit"
    description: ClassVar[str] = "AdamW with 8-bit moments (bitsandbytes' blockwise scheme): ~2 bytes per value"
    eight_bit: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        _check_min_8bit_size(self.min_8bit_size)

    def states(self, shape):
        return _moment_states(shape, ("m", "v"), self.min_8bit_size)

    def update(self, ops, p, g, state, step, lr, weight_decay):
        if "m_absmax" not in state:
            return super().update(ops, p, g, state, step, lr, weight_decay)
        m = dequantize(ops, state["m"], state["m_absmax"], SIGNED)
        v = dequantize(ops, state["v"], state["v_absmax"], UNSIGNED)
        p, m, v = adamw_update(p, g, m, v, step, lr, self.betas, self.eps, weight_decay, ops.sqrt)
        (m, m_absmax), (v, v_absmax) = quantize(ops, m, SIGNED), quantize(ops, v, UNSIGNED)
        return p, {"m": m, "m_absmax": m_absmax, "v": v, "v_absmax": v_absmax}


def _moment_states(shape: tuple[int, ...], moments: tuple[str, ...], min_8bit_size: int) -> dict[str, State]:
    """Each moment as 8-bit codes with a float32 absmax per block of BLOCK values, or as float32 where
    the value has fewer than min_8bit_size elements (bitsandbytes' rule)."""
    if math.prod(shape) < min_8bit_size:
        return {name: State(shape, "float32") for name in moments}
    blocks = (-(-math.prod(shape) // BLOCK),)
    return {key: spec for name in moments
            for key, spec in ((name, State(shape, "codes")), (f"{name}_absmax", State(blocks, "float32")))}


def _check_min_8bit_size(value: int) -> None:
    check(value >= 0, f"recipe key 'train.optimizer.min_8bit_size' must be 0 or more, got {value}.")


@dataclass(frozen=True)
class PagedAdamW(AdamW):
    name: ClassVar[str] = "paged_adamw"
    description: ClassVar[str] = "AdamW with its state in CUDA's paged memory (torch on CUDA only)"
    paged: ClassVar[bool] = True


@dataclass(frozen=True)
class PagedAdamW8bit(AdamW8bit):
    name: ClassVar[str] = "paged_adamw8bit"
    description: ClassVar[str] = "adamw8bit with its state in CUDA's paged memory (torch on CUDA only)"
    paged: ClassVar[bool] = True


@dataclass(frozen=True)
class Lion(Optimizer):
    """Lion (Chen et al., 2023), as mlx.optimizers.Lion and bitsandbytes compute it: the sign of an
    interpolation of momentum and gradient, decoupled weight decay, one moment."""

    betas: tuple[float, float] = (0.9, 0.99)

    name: ClassVar[str] = "lion"
    description: ClassVar[str] = "Lion: sign updates, one moment, 4 bytes of state per value"

    def validate(self) -> None:
        _betas("betas", self.betas)

    def states(self, shape):
        return {"m": State(shape)}

    def update(self, ops, p, g, state, step, lr, weight_decay):
        p, m = lion_update(p, g, state["m"], lr, self.betas, weight_decay, ops.sign)
        return p, {"m": m}


def lion_update(p, g, m, lr: float, betas, weight_decay: float, sign):
    b1, b2 = betas
    direction = sign(b1 * m + (1.0 - b1) * g)
    m = b2 * m + (1.0 - b2) * g
    if weight_decay:
        p = p * (1.0 - lr * weight_decay)
    return p - lr * direction, m


@dataclass(frozen=True)
class Lion8bit(Lion):
    """bitsandbytes' Lion8bit: Lion with its moment as 8-bit codes."""

    min_8bit_size: int = 4096

    name: ClassVar[str] = "lion8bit"
    description: ClassVar[str] = "Lion with an 8-bit moment (bitsandbytes' blockwise scheme): ~1 byte per value"
    eight_bit: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        _check_min_8bit_size(self.min_8bit_size)

    def states(self, shape):
        return _moment_states(shape, ("m",), self.min_8bit_size)

    def update(self, ops, p, g, state, step, lr, weight_decay):
        if "m_absmax" not in state:
            return super().update(ops, p, g, state, step, lr, weight_decay)
        m = dequantize(ops, state["m"], state["m_absmax"], SIGNED)
        p, m = lion_update(p, g, m, lr, self.betas, weight_decay, ops.sign)
        m, m_absmax = quantize(ops, m, SIGNED)
        return p, {"m": m, "m_absmax": m_absmax}


@dataclass(frozen=True)
class SGD(Optimizer):
    """torch.optim.SGD: weight decay added to the gradient (L2), optional momentum (its buffer starts
    as the first gradient), dampening and Nesterov."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    name: ClassVar[str] = "sgd"
    description: ClassVar[str] = "SGD with optional momentum and Nesterov: 0 or 4 bytes of state per value"

    def validate(self) -> None:
        check(0 <= self.momentum < 1, f"recipe key 'train.optimizer.momentum' must be in [0, 1), got {self.momentum}.")
        check(0 <= self.dampening <= 1,
              f"recipe key 'train.optimizer.dampening' must be in [0, 1], got {self.dampening}.")
        check(not self.nesterov or (self.momentum > 0 and self.dampening == 0),
              "recipe key 'train.optimizer.nesterov' needs momentum above 0 and no dampening (as torch's SGD).")

    def states(self, shape):
        return {"momentum": State(shape)} if self.momentum else {}

    def update(self, ops, p, g, state, step, lr, weight_decay):
        if weight_decay:
            g = g + weight_decay * p
        if not self.momentum:
            return p - lr * g, state
        buffer = g if step == 1 else self.momentum * state["momentum"] + (1.0 - self.dampening) * g
        g = g + self.momentum * buffer if self.nesterov else buffer
        return p - lr * g, {"momentum": buffer}


@dataclass(frozen=True)
class Adafactor(Optimizer):
    """transformers' Adafactor (Shazeer and Stern, 2018) and its defaults: a matrix's second moment
    factored into row and column means, the update clipped to RMS `clip_threshold`, and with
    `relative_step` a step size of min(1e-2, 1/sqrt(step)) (scaled by the value's RMS with
    `scale_parameter`) in place of train.lr and its schedule. mlx.optimizers.Adafactor is the same
    algorithm."""

    eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    beta1: float | None = None
    scale_parameter: bool = True
    relative_step: bool = True
    warmup_init: bool = False

    name: ClassVar[str] = "adafactor"
    description: ClassVar[str] = "Adafactor (transformers'): factored second moments, almost no state for matrices"
    elementwise: ClassVar[bool] = False

    def validate(self) -> None:
        check(len(self.eps) == 2 and all(e > 0 for e in self.eps),
              f"recipe key 'train.optimizer.eps' must be two numbers above 0, got {list(self.eps)}.")
        check(self.clip_threshold > 0,
              f"recipe key 'train.optimizer.clip_threshold' must be above 0, got {self.clip_threshold}.")
        check(-1 <= self.decay_rate < 0, f"recipe key 'train.optimizer.decay_rate' must be in [-1, 0), got {self.decay_rate}.")
        check(self.beta1 is None or 0 <= self.beta1 < 1,
              f"recipe key 'train.optimizer.beta1' must be null or in [0, 1), got {self.beta1}.")
        check(not self.warmup_init or self.relative_step,
              "recipe key 'train.optimizer.warmup_init' needs relative_step: true (as transformers' Adafactor).")

    def states(self, shape):
        states = {"m": State(shape)} if self.beta1 is not None else {}
        if len(shape) >= 2:
            return {**states, "row": State(shape[:-1]), "col": State(shape[:-2] + shape[-1:])}
        return {**states, "v": State(shape)}

    def relative(self, scheduled: float, step: int) -> float:
        if not self.relative_step:
            return scheduled
        return min(1e-6 * step if self.warmup_init else 1e-2, 1.0 / math.sqrt(step))

    def learning_rate(self, scheduled: float, step: int) -> float:
        return self.relative(scheduled, max(step, 1))

    def update(self, ops, p, g, state, step, lr, weight_decay):
        lr = self.relative(lr, step)
        if self.scale_parameter:  # a 0-d array: the value's RMS, at least eps[1]
            lr = ops.clamp_min(ops.rms(p), self.eps[1]) * lr
        beta2 = 1.0 - step**self.decay_rate
        squared = g * g + self.eps[0]
        new = {}
        if "row" in state:  # the second moment of a matrix: its row means and column means
            new["row"] = beta2 * state["row"] + (1.0 - beta2) * ops.mean(squared, -1)
            new["col"] = beta2 * state["col"] + (1.0 - beta2) * ops.mean(squared, -2)
            row_factor = 1.0 / ops.sqrt(new["row"] / ops.mean(new["row"], -1)[..., None])
            update = row_factor[..., None] * (1.0 / ops.sqrt(new["col"]))[..., None, :] * g
        else:
            new["v"] = beta2 * state["v"] + (1.0 - beta2) * squared
            update = 1.0 / ops.sqrt(new["v"]) * g
        update = update / ops.clamp_min(ops.rms(update) / self.clip_threshold, 1.0)
        update = update * lr
        if self.beta1 is not None:
            new["m"] = self.beta1 * state["m"] + (1.0 - self.beta1) * update
            update = new["m"]
        if weight_decay:
            p = p + p * (-weight_decay * lr)
        return p - update, new


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (
    AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, Lion, Lion8bit, SGD, Adafactor)}


def optimizer_keys(cls: type[Optimizer]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def optimizer_from_dict(raw, where: str = "train.optimizer") -> Optimizer:
    """The optimizer a recipe's `train.optimizer` names, its keys checked by name and value.

    Example:
        >>> optimizer_from_dict({"name": "lion", "betas": [0.95, 0.98]})
        Lion(betas=(0.95, 0.98))
    """
    if isinstance(raw, Optimizer):
        return raw
    for key in ("weight_decay", "lr") if isinstance(raw, dict) else ():
        if key in raw:
            what = "weight decay is train.weight_decay" if key == "weight_decay" else "the learning rate is train.lr"
            raise TwintuneError(f"recipe key '{where}.{key}': {what}, for every optimizer; set it there.")
    optimizer = named_section(raw, OPTIMIZERS, where, "optimizer", "adamw", "{name: adamw8bit}", bare_name=True)
    # lists from YAML as tuples: the dataclass stays hashable and equal to its defaults
    return dataclasses.replace(optimizer, **{f.name: tuple(getattr(optimizer, f.name)) for f in dataclasses.fields(optimizer)
                                             if isinstance(getattr(optimizer, f.name), list)})


def pack_state(states: dict[str, dict[str, np.ndarray]], step: int) -> dict[str, np.ndarray]:
    """A checkpoint's optimizer state: `STATE.VALUE_NAME` for each trainable value's state arrays
    (8-bit codes stay uint8), and `step`.

    Example:
        >>> sorted(pack_state({"w": {"m": np.zeros(2), "v": np.ones(2)}}, 3))
        ['m.w', 'step', 'v.w']
    """
    packed = {f"{key}.{name}": value for name, state in states.items() for key, value in state.items()}
    packed["step"] = np.array([step], np.int64)
    return packed


def unpack_state(optimizer: Optimizer, saved: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                 low_precision: frozenset[str] | set[str] = frozenset()) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """(each trainable value's state, the step) from what pack_state gave, for values of these shapes
    (those named in `low_precision` held in bfloat16, with their compensation); a checkpoint of
    another optimizer, or of other values, is refused by a sentence."""
    states = {}
    for name, shape in shapes.items():
        states[name] = {}
        for key, spec in optimizer.value_states(tuple(shape), name in low_precision).items():
            value = saved.get(f"{key}.{name}")
            if value is None or tuple(value.shape) != spec.shape:
                found = sorted({k.split(".", 1)[0] for k in saved if k != "step"})
                raise TwintuneError(f"the checkpoint's optimizer state has no {key!r} of shape {spec.shape} for {name} "
                                    f"(it holds {', '.join(found) or 'nothing'}), which optimizer {optimizer.name} "
                                    "keeps: it was saved by another optimizer or another method.")
            states[name][key] = value
    return states, int(saved["step"].reshape(-1)[0])
