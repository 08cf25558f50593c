"""KTO: preference tuning from unpaired answers, each labelled desirable or not (TRL's KTOTrainer).

A row is `prompt + completion + end-of-text` (columns `prompt`, `completion`, `label`), the
completion's tokens its targets; `r = logp_policy - logp_reference` (the reference: the base with
the method switched off). Per row, with β = `beta`:

- desirable: `desirable_weight · (1 - σ(β (r - z0)))`;
- undesirable: `undesirable_weight · (1 - σ(β (z0 - r)))`;

the loss their mean over the step's rows. z0 estimates the KL between policy and reference, as
TRL does, from mismatched answers: in each micro-batch, row i's prompt with row i-1's completion
(the first row takes the last's), z0 = max(0, mean(logp_policy - logp_reference)) over those rows,
with no gradient and no dropout. It is computed on the whole micro-batch on every process, so N
processes equal one (TRL estimates it per device and averages). A mismatched row is cut to the
micro-batch's longest row.

Metrics, TRL's names: `kl` (z0), `rewards/chosen` and `logps/chosen` over the desirable rows,
`rewards/rejected` and `logps/rejected` over the undesirable ones, `rewards/margins` (their
difference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from twintune.data.batching import Batch, Encoded, Encoder, make_batch
from twintune.data.documents import eos_id, random_splits
from twintune.data.preferences import UNPAIRED, answer, load_rows
from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.tasks.objectives import ModelAccess, Objective, Ops, row_sums
from twintune.tasks.preference import PairTask
from twintune.tasks.task import TaskData


@dataclass(frozen=True)
class KTOLoss(Objective):
    """The task's KTO loss over a batch of labelled rows (Batch.labels: 1 desirable, 0 undesirable);
    Batch.kl is z0."""

    task: "KTO"

    needs_reference: ClassVar[bool] = True
    figures: ClassVar[tuple[str, ...]] = ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                                          "desirable", "undesirable")

    def prepare(self, batch: Batch, model: ModelAccess, seed: int) -> Batch:
        mismatched = mismatched_rows(batch)
        rows, owners = mismatched.input_ids.shape[0], mismatched.target_rows()
        policy = np.bincount(owners, model.values(mismatched, "logps"), rows)
        reference = np.bincount(owners, model.values(mismatched, "logps", reference=True), rows)
        return dataclasses.replace(batch, kl=max(0.0, float(np.mean(policy - reference))))

    def loss(self, ops: Ops, values, batch: Batch) -> tuple[object, list]:
        logps = row_sums(ops, values, batch)
        ratio = logps - row_sums(ops, ops.array(batch.reference), batch)
        desirable = ops.array(batch.labels.astype(np.float64))
        undesirable = 1 - desirable
        # 1 - σ(x) = σ(-x), taken as exp(log σ(-x)): accurate where σ(x) is near 1
        beta = self.task.beta
        chosen_losses = ops.exp(ops.log_sigmoid(-beta * (ratio - batch.kl)))
        rejected_losses = ops.exp(ops.log_sigmoid(-beta * (batch.kl - ratio)))
        losses = (self.task.desirable_weight * desirable * chosen_losses
                  + self.task.undesirable_weight * undesirable * rejected_losses)
        rewards = beta * ratio
        rows = batch.input_ids.shape[0]
        return losses.sum(), [ops.array(np.array(batch.kl * rows)), (desirable * rewards).sum(),
                              (undesirable * rewards).sum(), (desirable * logps).sum(), (undesirable * logps).sum(),
                              desirable.sum(), undesirable.sum()]

    def summarize(self, sums: np.ndarray, examples: int) -> dict[str, float]:
        named = dict(zip(("loss", *self.figures), map(float, sums)))
        chosen, rejected = max(named.pop("desirable"), 1.0), max(named.pop("undesirable"), 1.0)
        figures = {"loss": named["loss"] / examples, "kl": named["kl"] / examples,
                   "rewards/chosen": named["rewards/chosen"] / chosen,
                   "rewards/rejected": named["rewards/rejected"] / rejected,
                   "logps/chosen": named["logps/chosen"] / chosen, "logps/rejected": named["logps/rejected"] / rejected}
        figures["rewards/margins"] = figures["rewards/chosen"] - figures["rewards/rejected"]
        return figures


def mismatched_rows(batch: Batch) -> Batch:
    """Row i's prompt with row i-1's completion (the first with the last's), each cut to the batch's
    width: the rows KTO's z0 is estimated on."""
    ids, width = batch.input_ids, batch.input_ids.shape[1]
    prompts, lengths = batch.prompt_lengths, batch.lengths
    rows = []
    for i in range(ids.shape[0]):
        j = i - 1 if i > 0 else ids.shape[0] - 1
        row = np.concatenate([ids[i, :prompts[i]], ids[j, prompts[j]:lengths[j]]])[:width]
        rows.append(Encoded(row.astype(np.int32), int(prompts[i]), 0))
    return make_batch(rows)


@dataclass(frozen=True)
class KTO(PairTask):
    """KTO on prompt/completion/label rows: each answer desirable (true) or not (false), no pairs."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_reference: bool = False  # the rows' own; z0's mismatched rows are scored every step

    rows_per_example: ClassVar[int] = 1
    name: ClassVar[str] = "kto"
    description: ClassVar[str] = "prompt/completion/label rows: KTO (desirable or undesirable answers, unpaired)"
    metrics: ClassVar[tuple[str, ...]] = ("val_loss", "val_rewards/margins", "val_kl")

    def validate(self) -> None:
        check(self.beta > 0, f"recipe key 'task.beta' must be above 0 (TRL's default is 0.1), got {self.beta}.")
        for key in ("desirable_weight", "undesirable_weight"):
            check(getattr(self, key) > 0, f"recipe key 'task.{key}' must be above 0, got {getattr(self, key)}.")

    @property
    def objective(self) -> KTOLoss:
        return KTOLoss(self)

    def data(self, data, seed: int, encoder: Encoder, length: int) -> TaskData:
        rows = load_rows(data.source, UNPAIRED, synthetic_size=data.synthetic_size, seed=seed, split=data.split,
                         config=data.config, chat=encoder.chat)
        desirable = sum(row["label"] for row in rows)
        if desirable in (0, len(rows)):
            kind = "desirable (true)" if desirable else "undesirable (false)"
            raise TwintuneError(f"every row of {data.source} is labelled {kind}; KTO weighs desirable against "
                                "undesirable answers and needs rows of both labels.")
        tokenizer, eos = encoder.tokenizer, eos_id(encoder.tokenizer)
        encoded = []
        for i, row in enumerate(rows, 1):
            where = f"row {i} of {data.source}"
            prompt = tokenizer.encode(row["prompt"], add_special_tokens=False).ids
            if len(prompt) >= length:
                raise TwintuneError(f"{where}: its prompt is {len(prompt)} tokens, leaving no room for an answer within "
                                    f"data.max_length={length}; raise data.max_length or shorten the prompt.")
            text = answer(row["prompt"], row["completion"], row.get("conversational", False))
            completion = tokenizer.encode(text, add_special_tokens=False).ids
            row_ids = self.encode_row(prompt, completion + [eos], encoder, length, where)
            encoded.append(dataclasses.replace(row_ids, label=int(row["label"])))
        parts = random_splits(len(encoded), data.validation_fraction, data.test_fraction, seed, data.source, "rows")
        return TaskData({split: [encoded[i] for i in idx] for split, idx in parts.items()})

    def evaluate(self, scorer, split: str):
        report = super().evaluate(scorer, split)
        return dataclasses.replace(report, unit="rows")
