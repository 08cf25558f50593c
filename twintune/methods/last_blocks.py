"""The last N blocks train, the rest stays frozen: transfer learning's partial freezing.

With the last blocks go the final LayerNorm, and with `include_embeddings` the token and
position embeddings (the token embedding is also the output layer: GPT-Neo ties them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.methods.base import BaseModel, Comparison, Unfreezing, block_index


@dataclass(frozen=True)
class LastBlocks(Unfreezing):
    """Train the last `n` blocks (and the final LayerNorm).

    Example:
        >>> LastBlocks(n=1).plan(base, seed=0).unfrozen()[0]   # a 4-block model
        'transformer.ln_f.weight'
    """

    n: int = 2
    include_embeddings: bool = False

    name: ClassVar[str] = "last_blocks"
    listed: ClassVar[int] = 4  # its place in `twintune methods` and in sentences that list methods
    title: ClassVar[str] = "last-blocks"
    description: ClassVar[str] = "the last n blocks and the final LayerNorm train (partial freezing)"
    comparisons: ClassVar[tuple[Comparison, ...]] = (
        Comparison("last_blocks", "full", {"n": 2, "include_embeddings": True}, 3e-3),
    )

    def validate(self) -> None:
        check(self.n > 0, f"recipe key 'method.n' must be a positive number of blocks, got {self.n}.")

    def parameters(self, base: BaseModel) -> list[str]:
        blocks = base.spec.num_layers
        if self.n > blocks:
            raise TwintuneError(f"method.n={self.n} is larger than this model's {blocks} blocks.")
        first = blocks - self.n
        embeddings = ("transformer.wte.weight", "transformer.wpe.weight") if self.include_embeddings else ()
        in_last_blocks = lambda name: block_index(name) is not None and block_index(name) >= first
        names = [name for name in base.spec.weight_shapes()
                 if in_last_blocks(name) or name.startswith("transformer.ln_f.") or name in embeddings]
        return names
