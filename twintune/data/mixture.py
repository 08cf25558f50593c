"""Multi-task mixtures (`data.mixture`): several sources, each with its own task and template,
sampled by weight into every training step.

Each example slot of a step draws its source with probability weight / total, from a generator
seeded by (seed, step); each source is read in its own seeded permutations, epoch after epoch, and
how far a source has been read before step s is the number of its draws in steps 0..s-1. So step
s's examples are a function of (seed, s) alone: a resumed run takes the same batches, and the
mixture needs no state in a checkpoint.

Every source keeps its own validation split, so a run reports each source's validation loss and
perplexity beside the whole mixture's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twintune.data.batching import Batch, Encoded, make_batch
from twintune.errors import TwintuneError

MIXTURE_STREAM = 0x4D49  # "MI": the draws' own generator stream, apart from the epoch permutations'


class MixtureOrder:
    """The seeded order of training micro-batches drawn from several sources by weight, addressable
    by optimizer step (the interface of TrainOrder).

    Example:
        >>> a = [Encoded(np.arange(1, 9, dtype=np.int32), 1, 0) for _ in range(30)]
        >>> b = [Encoded(np.arange(1, 5, dtype=np.int32), 1, 0) for _ in range(30)]
        >>> order = MixtureOrder([a, b], [3.0, 1.0], batch_size=8, grad_accum=1, seed=0)
        >>> order.step_batches(10)[0].input_ids.shape[0]
        8
    """

    def __init__(self, sources: list[list[Encoded]], weights: list[float], batch_size: int, grad_accum: int,
                 seed: int, pad_id: int = 0):
        if any(not source for source, w in zip(sources, weights) if w > 0):
            raise TwintuneError("a mixture source with a positive weight has no training examples.")
        self.sources = sources
        self.probabilities = np.asarray(weights, np.float64) / float(sum(weights))
        self.batch_size = batch_size
        self.examples_per_step = batch_size * grad_accum
        self.seed = seed
        self.pad_id = pad_id
        # an "epoch" of the mixture: as many examples as all sources hold together
        self.steps_per_epoch = -(-sum(map(len, sources)) // self.examples_per_step)
        self._read = [np.zeros(len(sources), np.int64)]  # _read[s]: each source's examples read before step s
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def draws(self, step: int) -> np.ndarray:
        """The source of each example slot of `step`."""
        rng = np.random.default_rng([self.seed, MIXTURE_STREAM, step])
        return rng.choice(len(self.sources), size=self.examples_per_step, p=self.probabilities)

    def read_before(self, step: int) -> np.ndarray:
        """How many examples of each source the steps before `step` took."""
        while len(self._read) <= step:
            counts = np.bincount(self.draws(len(self._read) - 1), minlength=len(self.sources))
            self._read.append(self._read[-1] + counts)
        return self._read[step]

    def example(self, source: int, position: int) -> Encoded:
        """The `position`-th example of a source's stream: its seeded permutations, one per pass."""
        examples = self.sources[source]
        epoch, within = divmod(position, len(examples))
        if (source, epoch) not in self._permutations:
            rng = np.random.default_rng([self.seed, source, epoch])
            self._permutations = {(source, epoch): rng.permutation(len(examples)),
                                  **{k: v for k, v in self._permutations.items() if k[0] != source}}
        return examples[self._permutations[source, epoch][within]]

    def step_examples(self, step: int) -> list[tuple[int, Encoded]]:
        """(source, example) for each slot of `step`, in slot order."""
        next_position = self.read_before(step).copy()
        chosen = []
        for source in self.draws(step):
            chosen.append((int(source), self.example(source, int(next_position[source]))))
            next_position[source] += 1
        return chosen

    def step_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step `step` (0-based)."""
        chosen = [example for _, example in self.step_examples(step)]
        return [make_batch(chosen[s: s + self.batch_size], self.pad_id) for s in range(0, len(chosen), self.batch_size)]


def source_name(source: str) -> str:
    """A source's name in metrics: its file's stem, or the source itself."""
    return Path(source).stem if Path(source).suffix else source
