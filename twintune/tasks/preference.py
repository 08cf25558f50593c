"""Direct preference tuning: the method learns, from pairs of answers to one prompt, to give the
chosen answer more probability than the rejected one, relative to a reference model (DPO and kin)
or on its own (ORPO, SimPO). Formulas and defaults are TRL's (../shared/REFERENCES.md).

Each pair is two answers, `prompt + chosen + end-of-text` and `prompt + rejected + end-of-text`, their
targets the answer's tokens: on GPT-Neo one row of a batch that runs the prompt once
(data/batching.py shared_prompt_batch), elsewhere two adjacent rows; `logp` below is an answer's summed target
log-probability, `avg` that over its target count, `r = logp_policy - logp_reference`,
`Δ = r_chosen - r_rejected`:

- dpo: `-(1-ε) log σ(βΔ) - ε log σ(-βΔ)` (ε = label_smoothing: conservative DPO);
- ipo: `(Δ_avg - 1/(2β))²`, with per-token averaged log-probabilities;
- hinge: `relu(1 - βΔ)`;
- robust: `(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)`;
- orpo (no reference): `NLL(chosen) - β log σ(log_odds)`, `log_odds = (p_c - p_r) - (log(1 - e^p_c) -
  log(1 - e^p_r))` (log1mexp) with p the averaged log-probabilities; NLL(chosen) is the chosen answer's mean
  cross-entropy per token (TRL averages over the batch's chosen tokens: the same when the answers
  of a batch have one length);
- simpo (no reference): `-(1-ε) log σ(βz) - ε log σ(-βz)`, `z = avg_c - avg_r - γ/β`.

The reference is the same base with the method switched off (the backend's base view: no copy).
Metrics, per pair, with TRL's names: rewards/chosen (β r_c; orpo and simpo: β avg_c), rewards/rejected,
rewards/accuracies (chosen's reward above rejected's), rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from twintune.data.batching import Batch, Encoded, Encoder
from twintune.data.documents import eos_id, random_splits
from twintune.data.preferences import PAIRED, answer, load_rows
from twintune.errors import TwintuneError
from twintune.keys import check
from twintune.tasks.objectives import Objective, Ops, log1mexp, row_counts, row_sums
from twintune.tasks.reports import PreferenceReport
from twintune.tasks.task import Scorer, Task, TaskData, refuse_general_text

LOSSES = ("dpo", "ipo", "hinge", "robust", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
PAIR_FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


@dataclass(frozen=True)
class PreferenceLoss(Objective):
    """The task's loss (one of LOSSES, with its keys) over a batch of pairs (rows chosen, rejected, ...)."""

    task: "Preference"

    @property
    def kind(self) -> str:
        return self.task.loss

    @property
    def beta(self) -> float:
        return self.task.beta

    @property
    def needs_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE

    @property
    def figures(self) -> tuple[str, ...]:
        extra = ("nll_loss", "log_odds_ratio", "log_odds_chosen") if self.kind == "orpo" else ()
        return PAIR_FIGURES + extra

    def loss(self, ops: Ops, values, batch: Batch) -> tuple[object, list]:
        logps, counts = row_sums(ops, values, batch), row_counts(batch)
        chosen, rejected = logps[0::2], logps[1::2]
        n_chosen, n_rejected = ops.array(counts[0::2]), ops.array(counts[1::2])
        if self.needs_reference:
            reference = row_sums(ops, ops.array(batch.reference), batch)
            chosen_ref, rejected_ref = reference[0::2], reference[1::2]
            chosen_ratio, rejected_ratio = chosen - chosen_ref, rejected - rejected_ref
            if self.kind == "ipo":  # IPO compares per-token averages (its rewards stay TRL's: summed)
                losses = self._referenced(ops, chosen_ratio / n_chosen - rejected_ratio / n_rejected)
            else:
                losses = self._referenced(ops, chosen_ratio - rejected_ratio)
            chosen_reward, rejected_reward = self.beta * chosen_ratio, self.beta * rejected_ratio
            extra = []
        else:
            chosen_avg, rejected_avg = chosen / n_chosen, rejected / n_rejected
            chosen_reward, rejected_reward = self.beta * chosen_avg, self.beta * rejected_avg
            losses, extra = self._reference_free(ops, chosen_avg, rejected_avg)
        figures = [chosen_reward.sum(), rejected_reward.sum(), (chosen_reward > rejected_reward).sum(),
                   (chosen_reward - rejected_reward).sum(), chosen.sum(), rejected.sum(), *extra]
        return losses.sum(), figures

    def _referenced(self, ops: Ops, delta):
        beta, eps = self.beta, self.task.label_smoothing
        if self.kind == "dpo":
            return -(1 - eps) * ops.log_sigmoid(beta * delta) - eps * ops.log_sigmoid(-beta * delta)
        if self.kind == "ipo":
            difference = delta - 1 / (2 * beta)
            return difference * difference
        if self.kind == "hinge":
            return ops.relu(1 - beta * delta)
        return (-(1 - eps) * ops.log_sigmoid(beta * delta) + eps * ops.log_sigmoid(-beta * delta)) / (1 - 2 * eps)

    def _reference_free(self, ops: Ops, chosen_avg, rejected_avg):
        beta, eps = self.beta, self.task.label_smoothing
        if self.kind == "simpo":
            z = chosen_avg - rejected_avg - self.task.simpo_gamma / beta
            return -(1 - eps) * ops.log_sigmoid(beta * z) - eps * ops.log_sigmoid(-beta * z), []
        log_odds = (chosen_avg - rejected_avg) - (log1mexp(ops, chosen_avg) - log1mexp(ops, rejected_avg))
        ratio = beta * ops.log_sigmoid(log_odds)
        nll = -chosen_avg
        return nll - ratio, [nll.sum(), ratio.sum(), log_odds.sum()]


# why no gradient would reach a method trained on pairs (`twintune doctor`)
SAME_ANSWERS = "each pair's chosen and rejected answers may be the same text (their difference is all a pair's loss sees)"


class PairTask(Task):
    """A task trained on preference pairs (data/preferences.py): its rows, splits and refusals."""

    rows_per_example: ClassVar[int] = 2
    number_columns: ClassVar[tuple[str, ...]] = ()  # optional columns of numbers it reads (the reward's margin)
    shares_prompts: ClassVar[bool] = False  # whether a batch may run a pair's prompt once (make_batch)

    cannot_predict: ClassVar[str | None] = ("it ranks answers to a prompt, not labels; evaluate it with twintune "
                                            "eval, or generate with twintune generate")

    def shots_refusal(self) -> str:
        return f"--shots puts labelled sentences before each sentence; a {self.name} run ranks answers and has no labels"

    def check_recipe(self, recipe) -> None:
        if recipe.data.mixture:
            raise TwintuneError(f"data.mixture mixes generative tasks (causal_lm, instruction); task {self.name} "
                                "trains on one data.source of preference pairs.")
        refuse_general_text(recipe, "tunes by preferences between answers, not by next tokens of text")

    def data(self, data, seed: int, encoder: Encoder, length: int) -> TaskData:
        rows = load_rows(data.source, PAIRED, synthetic_size=data.synthetic_size, seed=seed, split=data.split,
                         config=data.config, numbers=self.number_columns, chat=encoder.chat)
        pairs = [self.encode_pair(row, encoder, length, f"row {i} of {data.source}") for i, row in enumerate(rows, 1)]
        parts = random_splits(len(pairs), data.validation_fraction, data.test_fraction, seed, data.source, "pairs")
        return TaskData({split: [pairs[i] for i in idx] for split, idx in parts.items()})

    def encode_pair(self, row: dict, encoder: Encoder, length: int, where: str) -> Encoded:
        """The pair as its chosen row with the rejected one attached (Encoded.rejected)."""
        if row["chosen"] == row["rejected"]:
            raise TwintuneError(f"{where}: chosen equals rejected, so the pair prefers nothing; drop it or fix it.")
        tokenizer, eos = encoder.tokenizer, eos_id(encoder.tokenizer)
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=False).ids
        if len(prompt) >= length:
            raise TwintuneError(f"{where}: its prompt is {len(prompt)} tokens, leaving no room for an answer within "
                                f"data.max_length={length}; raise data.max_length or shorten the prompt.")
        texts = {key: answer(row["prompt"], row[key], row.get("conversational", False)) for key in ("chosen", "rejected")}
        chosen, rejected = (self.encode_row(prompt, tokenizer.encode(texts[key], add_special_tokens=False).ids + [eos],
                                            encoder, length, f"{where} ({key})") for key in ("chosen", "rejected"))
        chosen.rejected = rejected
        chosen.shares_prompt = self.shares_prompts and encoder.share_prompts
        return chosen

    def encode_row(self, prompt: list[int], completion: list[int], encoder: Encoder, length: int, where: str) -> Encoded:
        """One answer's row: the prompt, then the answer and end-of-text, its targets."""
        ids = prompt + completion
        if len(ids) > length:
            raise TwintuneError(f"{where} is {len(ids)} tokens with its prompt, longer than data.max_length={length}; "
                                "raise it (up to the model's context) or shorten the answer.")
        encoder.check_method_fits(len(ids), max(len(prompt), 1), f" {where}")
        return Encoded(np.array(ids, np.int32), max(len(prompt), 1), 0)

    def evaluate(self, scorer: Scorer, split: str) -> PreferenceReport:
        sums, count = scorer.objective_sums(split, self.objective)
        return PreferenceReport(self.objective.summarize(sums, count), count)


@dataclass(frozen=True)
class Preference(PairTask):
    """DPO and its family on preference pairs: `loss` dpo | ipo | hinge | robust | orpo | simpo."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: str = ""  # another run's directory: its adapter, frozen, is the reference
    precompute_reference: bool = False

    shares_prompts: ClassVar[bool] = True
    name: ClassVar[str] = "preference"
    description: ClassVar[str] = "prompt/chosen/rejected pairs: DPO, IPO, hinge, robust, ORPO or SimPO"
    metrics: ClassVar[tuple[str, ...]] = ("val_loss", "val_rewards/accuracies", "val_rewards/margins")
    no_gradient: ClassVar[str] = SAME_ANSWERS

    def validate(self) -> None:
        check(self.loss in LOSSES, f"recipe key 'task.loss' must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        check(self.beta > 0, f"recipe key 'task.beta' must be above 0 (TRL's default is 0.1), got {self.beta}.")
        check(0 <= self.label_smoothing < 0.5,
              f"recipe key 'task.label_smoothing' must be in [0, 0.5), got {self.label_smoothing}.")
        check(self.simpo_gamma >= 0, f"recipe key 'task.simpo_gamma' must be 0 or more, got {self.simpo_gamma}.")
        if self.loss in REFERENCE_FREE:
            for key, used in (("reference", bool(self.reference)), ("precompute_reference", self.precompute_reference)):
                check(not used, f"recipe key 'task.{key}' sets a reference model, which loss {self.loss} does not "
                                "use; drop it.")

    @property
    def objective(self) -> PreferenceLoss:
        return PreferenceLoss(self)

