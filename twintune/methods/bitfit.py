"""BitFit (Ben Zaken et al., 2022): only the biases train.

GPT-Neo's biases: every block's out_proj, c_fc and c_proj, both LayerNorms, and the final
LayerNorm (q, k and v have none). Saved in twintune's layout: the trained biases under the
base's own names, so a merge simply puts them in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.methods.base import BaseModel, Comparison, Unfreezing


@dataclass(frozen=True)
class BitFit(Unfreezing):
    """Train every bias of the base model.

    Example:
        >>> BitFit().plan(base, seed=0).unfrozen()[:2]
        ['transformer.ln_f.bias', 'transformer.h.0.attn.attention.out_proj.bias']
    """

    name: ClassVar[str] = "bitfit"
    listed: ClassVar[int] = 3  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "BitFit"
    description: ClassVar[str] = "only the biases train (linear and LayerNorm biases)"
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("bitfit", "weight methods", {}, 1e-2),
    )

    def parameters(self, base: BaseModel) -> list[str]:
        return [n for n in base.spec.weight_shapes() if n.endswith(".bias")]
