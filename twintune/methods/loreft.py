"""LoReFT (Wu et al., 2024, pyreft): h + Rᵀ(W h + b − R h) on chosen blocks' outputs, at chosen prompt positions.

R (r × d) has orthonormal rows: the intervention replaces the part of h in R's row space, R h, by
the learned W h + b, and leaves the rest of h alone. pyreft intervenes on the residual stream after
a block (`block_output`), at the first f and last l positions of each example's prompt; so does
twintune, in the block's `intervention` slot (backends/X/gpt_neo.py). The label tokens after the
prompt are never intervened on, as in pyreft.

Keeping R orthonormal: the trainable value `rotate_layer` is an unconstrained r × d matrix and
the intervention uses its Gram-Schmidt orthonormalisation (the Q of a QR factorisation with a
positive diagonal, modified Gram-Schmidt; `orthonormal_rows`), which both backends compute with
the same plain operations (products, sums, a square root, a division; no library QR, which MLX
cannot differentiate on the CPU). Why this map, not pyreft's (torch's `orthogonal` parametrisation,
Householder reflections for a non-square R) or a Cayley map or matrix exponential:
- it is exact: the rows it gives are orthonormal to rounding (~1e-7 in float32) for any matrix of
  full row rank; it costs r(r+1)/2 dot products of length d, nothing of size d × d;
- it is the identity on matrices that are already orthonormal, so the trained R itself is the
  saved value and loads back as the starting trainable value, giving the same function: one form
  of the method, whose tensors are pyreft's `rotate_layer`, `weight` and `bias`.

Positions (`positions`: pyreft's "f<N>+l<M>", "f<N>" or "l<M>"): each row's first f and last l prompt
tokens (`prompt_lengths`; a row without one is all prompt). pyreft shortens f and l to half the
prompt and pads with a dummy position; twintune refuses an example whose prompt has fewer than
f + l tokens (naming it), so the first and last positions never overlap and every example gets
the function the recipe asked for. With `share_weights` false (pyreft's default) and both f and l
set, the last positions get their own R, W and b.

Saved (layout "twintune", adapter_model.safetensors), per intervened block N:

    transformer.h.N.intervention.rotate_layer           (r, d)  R, orthonormal rows (the
                                                                 orthonormalised value; pyreft's
                                                                 rotate_layer is its transpose)
    transformer.h.N.intervention.learned_source.weight  (r, d)  W
    transformer.h.N.intervention.learned_source.bias    (r,)    b
    transformer.h.N.intervention.last.*                          the same three for the last
                                                                 positions, when they have their own

The training checkpoint keeps `rotate_layer` as it trains (not orthonormalised), so a resumed run
continues exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.methods.base import (INSERT, BaseModel, Comparison, Layer, Method, Plan, Surgery, chosen_blocks,
                                   gpt_neo_slots)

_POSITIONS = re.compile(r"f(\d+)\+l(\d+)|f(\d+)|l(\d+)")


def parse_positions(positions: str) -> tuple[int, int] | None:
    """(first, last) from pyreft's "f<N>+l<M>", "f<N>" or "l<M>"; None when the text is not one of them."""
    found = _POSITIONS.fullmatch(positions.strip())
    if not found:
        return None
    first, last, only_first, only_last = (int(g) if g is not None else 0 for g in found.groups())
    return first + only_first, last + only_last


def orthonormal_rows(matrix: np.ndarray) -> np.ndarray:
    """The rows of `matrix` orthonormalised by modified Gram-Schmidt (computed in float64, returned
    in the matrix's dtype): the numpy reference of what both backends compute.

    Example:
        >>> R = orthonormal_rows(np.random.default_rng(0).normal(size=(4, 64)))
        >>> bool(np.allclose(R @ R.T, np.eye(4)))
        True
    """
    rows = []
    for v in np.asarray(matrix, np.float64):
        for q in rows:
            v = v - (v @ q) * q
        rows.append(v / np.sqrt(v @ v))
    return np.stack(rows).astype(matrix.dtype)


def orthogonal_init(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """A random matrix with orthonormal rows, drawn as torch.nn.init.orthogonal_ draws it (the QR
    of a Gaussian matrix, signs fixed by R's diagonal), as pyreft initialises R."""
    q, upper = np.linalg.qr(rng.standard_normal((columns, rows)))
    return (q * np.sign(np.diag(upper))).T.astype(np.float32)


@dataclass(frozen=True, eq=False)
class LoReFTLayer(Layer):
    """An intervention on a block's output at the first `first` and last `last` prompt positions
    (`separate_last`: the last positions with their own values)."""

    first: int
    last: int
    separate_last: bool
    dropout: float


@dataclass(frozen=True)
class LoReFT(Method):
    """Low-rank linear subspace representation fine-tuning (pyreft's LoreftIntervention).

    Example:
        >>> plan = LoReFT(r=4, layers=[1, 3]).plan(base, seed=0)   # base: the built-in tiny GPT-Neo (d = 64)
        >>> plan.trainable_parameters()   # 2 blocks x (first, last positions) x (R, W: 4 x 64; b: 4)
        2064
    """

    r: int = 4  # pyreft's README example (its loreft/train.py uses 8)
    layers: list[int] = ()  # block numbers; none listed: every block (pyreft's `-l all`)
    positions: str = "f1+l1"
    share_weights: bool = False
    dropout: float = 0.0

    name: ClassVar[str] = "loreft"
    listed: ClassVar[int] = 10  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "LoReFT"
    description: ClassVar[str] = ("h + R^T(W h + b - R h) on blocks' outputs at the first and last prompt positions, "
                                  "R with orthonormal rows (pyreft LoReFT)")
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("loreft", "module methods", {"r": 8, "positions": "f4+l8"}, 3e-2),
    )

    def kept_for_backward(self, shapes, linear) -> tuple[set[str], float]:
        """The block output each intervention reads, R h and W h + b."""
        inputs, extra = super().kept_for_backward(shapes, linear)
        extra += sum(shape[1] + 2 * shape[0] for name, shape in shapes.items() if name.endswith("rotate_layer"))
        return inputs, extra

    def validate(self) -> None:
        check(self.r > 0, f"recipe key 'method.r' must be a positive rank, got {self.r}.")
        check(0 <= self.dropout < 1, f"recipe key 'method.dropout' must be in [0, 1), got {self.dropout}.")
        check(all(i >= 0 for i in self.layers),
              f"recipe key 'method.layers' must list block numbers >= 0, got {list(self.layers)}.")
        counts = parse_positions(self.positions)
        check(counts is not None and sum(counts) > 0,
              f"recipe key 'method.positions' must be f<N>+l<M>, f<N> or l<M> (the first N and last M prompt "
              f"tokens, as in pyreft), such as f1+l1; got {self.positions!r}.")

    @property
    def first_last(self) -> tuple[int, int]:
        return parse_positions(self.positions)

    @property
    def separate_last(self) -> bool:
        """Whether the last positions get their own R, W and b (pyreft: unshared weights, both kinds of position)."""
        first, last = self.first_last
        return not self.share_weights and first > 0 and last > 0

    def blocks(self, spec) -> list[int]:
        spec = gpt_neo_slots(self.name, spec, "the blocks' intervention")
        if self.r > spec.hidden_size:
            raise TwintuneError(f"LoReFT rank r={self.r} is larger than the model's width {spec.hidden_size} (R needs "
                                "r orthonormal rows of that length).")
        return chosen_blocks(self.layers, spec.num_layers)

    def plan(self, base: BaseModel, seed: int) -> Plan:
        """R drawn orthonormal (torch's orthogonal_), W and b as torch's Linear(d, r) initialises them, as in pyreft."""
        blocks = self.blocks(base.spec)
        d = base.spec.hidden_size
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(d)
        first, last = self.first_last
        layer = LoReFTLayer(first, last, self.separate_last, self.dropout)
        surgeries = []
        for block in blocks:
            slot = f"transformer.h.{block}.intervention"
            values = {}
            for part in ("", "last.") if self.separate_last else ("",):
                values[f"{slot}.{part}rotate_layer"] = orthogonal_init(rng, self.r, d)
                values[f"{slot}.{part}learned_source.weight"] = rng.uniform(-bound, bound, (self.r, d)).astype(np.float32)
                values[f"{slot}.{part}learned_source.bias"] = rng.uniform(-bound, bound, (self.r,)).astype(np.float32)
            surgeries.append(Surgery(INSERT, slot, values, layer))
        return Plan(self.name, tuple(surgeries))

    def prompt_problem(self, prompt_tokens: int) -> str | None:
        first, last = self.first_last
        if prompt_tokens < first + last:
            return (f"its prompt has {prompt_tokens} tokens, fewer than the {first + last} that method loreft's "
                    f"positions {self.positions} intervene on; choose fewer positions")
        return None

    def saved_values(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """R as the intervention uses it (orthonormalised); W and b as they are."""
        return {name: orthonormal_rows(value) if name.endswith(".rotate_layer") else value
                for name, value in state.items()}

    def merge(self, base: BaseModel, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise TwintuneError("method loreft cannot be merged into the base model: its interventions change hidden "
                            "states at chosen prompt positions only, which no weight of the model can do.")
