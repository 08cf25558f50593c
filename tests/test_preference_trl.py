"""Our preference losses equal TRL's own code on the same log-probabilities: DPOTrainer's loss
(sigmoid, hinge, ipo, robust), ORPOTrainer's odds-ratio term, CPOTrainer's SimPO loss and
KTOTrainer's loss.

TRL computes these inside its trainers' methods; each is called here on a stand-in for the trainer
(the attributes the method reads) and a stand-in model whose per-token log-probabilities are ours.
"""

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from twintune.data.batching import Batch
from twintune.tasks.objectives import NUMPY
from twintune.tasks.preference import Preference

PAIRS, WIDTH = 4, 6
RNG = np.random.default_rng(11)
COUNTS = RNG.integers(1, WIDTH, size=2 * PAIRS)  # rows chosen, rejected, chosen, ... : their answer lengths
POLICY = -RNG.uniform(0.05, 2.0, (2 * PAIRS, WIDTH))
REFERENCE = POLICY + RNG.normal(0, 0.4, POLICY.shape)
MASK = np.arange(WIDTH)[None, :] < COUNTS[:, None]  # each row's answer tokens


def _ours(kind, **keys):
    """Our summed loss over the pairs, divided by their count (TRL's mean)."""
    rows, columns = np.nonzero(MASK)
    batch = Batch(np.zeros((2 * PAIRS, WIDTH + 1), np.int32), (rows * (WIDTH + 1) + columns).astype(np.int32),
                  np.zeros(len(rows), np.int32), np.zeros(2 * PAIRS, np.int32), np.zeros(2 * PAIRS, np.int32),
                  COUNTS.astype(np.int32), group=2, reference=REFERENCE[rows, columns])
    objective = Preference(loss=kind, **keys).objective
    loss, figures = objective.loss(NUMPY, POLICY[rows, columns], batch)
    return loss / PAIRS, dict(zip(objective.figures, np.array(figures) / PAIRS))


def _trl_order(rows):
    """TRL's batches hold every chosen row, then every rejected row."""
    return torch.tensor(np.concatenate([rows[0::2], rows[1::2]]))


def _trl_dpo(loss_type, beta, label_smoothing=0.0):
    from trl.trainer.dpo_trainer import DPOTrainer

    mask = _trl_order(MASK.astype(np.int64))
    per_token = torch.where(mask.bool(), _trl_order(POLICY), 0.0)
    reference = (_trl_order(REFERENCE) * mask).sum(dim=1)
    # TRL shifts the completion mask by one (logits at t predict t + 1): pad one column in front
    completion_mask = torch.cat([torch.zeros(2 * PAIRS, 1, dtype=torch.long), mask], dim=1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(mask, dtype=torch.bool))
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=accelerator, aux_loss_enabled=False,
                              ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                              use_weighting=False, _metrics={"eval": defaultdict(list)}, _tp_size=1,
                              _total_train_tokens=0)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": reference[:PAIRS],
              "ref_rejected_logps": reference[PAIRS:]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss.item(), {name: values[0] for name, values in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("kind,trl_name,keys", [
    ("dpo", "sigmoid", {"beta": 0.1}), ("hinge", "hinge", {"beta": 0.4}), ("ipo", "ipo", {"beta": 0.3}),
    ("robust", "robust", {"beta": 0.2, "label_smoothing": 0.15}),
])
def test_dpo_family_losses_and_metrics_equal_trls_dpo_trainer(kind, trl_name, keys):
    ours, figures = _ours(kind, **keys)
    theirs, metrics = _trl_dpo(trl_name, **keys)
    assert ours == pytest.approx(theirs, rel=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert figures[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), name


def _averages():
    sums = (POLICY * MASK).sum(axis=1)
    averages = sums / COUNTS
    return torch.tensor(averages[0::2]), torch.tensor(averages[1::2])


def test_orpos_odds_ratio_term_equals_trls():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    beta = 0.25
    chosen, rejected = _averages()
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, log_odds = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    # TRL's ORPO loss: the chosen answers' NLL minus the mean of these; ours per pair, each answer's mean NLL
    nll = -chosen.mean().item()
    ours, figures = _ours("orpo", beta=beta)
    assert ours == pytest.approx(nll - losses.mean().item(), rel=1e-6)
    assert figures["log_odds_chosen"] == pytest.approx(log_odds.item(), rel=1e-6)
    assert figures["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-6)


def test_simpo_equals_trls_cpo_trainer_with_loss_type_simpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    keys = {"beta": 2.0, "simpo_gamma": 0.7, "label_smoothing": 0.1}
    chosen, rejected = _averages()
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", accelerator=SimpleNamespace(device="cpu"), **keys)
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    ours, figures = _ours("simpo", **keys)
    assert ours == pytest.approx(losses.mean().item(), rel=1e-6)
    assert figures["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-6)


def test_kto_equals_trls_kto_trainer():
    from trl.trainer.kto_trainer import KTOTrainer

    from twintune.tasks.kto import KTO

    rows = 2 * PAIRS
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    kl_policy, kl_reference = -RNG.uniform(0.5, 3.0, rows), -RNG.uniform(0.5, 3.0, rows)
    beta, desirable_weight, undesirable_weight = 0.3, 1.0, 1.4
    mask = torch.tensor(MASK.astype(np.int64))
    per_token = torch.where(mask.bool(), torch.tensor(POLICY), 0.0)
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask], dim=1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token))
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=accelerator, aux_loss_enabled=False,
                              precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
                              desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                              _metrics={"eval": defaultdict(list)}, _tp_size=1, _total_train_tokens=0,
                              _compute_kl_logps=lambda model, batch: torch.tensor(kl_policy))
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "label": torch.tensor(labels.astype(bool)),
              "ref_logps": torch.tensor((REFERENCE * MASK).sum(axis=1)), "ref_KL_logps": torch.tensor(kl_reference)}
    theirs = KTOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False).item()
    metrics = {name: values[0] for name, values in trainer._metrics["eval"].items()}

    positions = np.nonzero(MASK)
    batch = Batch(np.zeros((rows, WIDTH + 1), np.int32), (positions[0] * (WIDTH + 1) + positions[1]).astype(np.int32),
                  np.zeros(len(positions[0]), np.int32), np.zeros(rows, np.int32), labels.astype(np.int32),
                  COUNTS.astype(np.int32), reference=REFERENCE[positions], kl=max(0.0, float(np.mean(kl_policy - kl_reference))))
    objective = KTO(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight).objective
    loss, figures = objective.loss(NUMPY, POLICY[positions], batch)
    ours = objective.summarize(np.array([loss, *figures]), rows)
    assert ours["loss"] == pytest.approx(theirs, rel=1e-6)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert ours[name] == pytest.approx(metrics[name], rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("coefficient", [0.0, 0.01])
def test_bradley_terry_with_a_margin_equals_trls_reward_trainer(coefficient):
    from trl.trainer.reward_trainer import RewardTrainer

    from twintune.tasks.reward import BradleyTerry

    scores = RNG.normal(0, 2, 2 * PAIRS)  # rows chosen, rejected, chosen, ...
    margins = RNG.uniform(0, 1.5, PAIRS)
    batch = Batch(np.zeros((2 * PAIRS, 2), np.int32), (np.arange(2 * PAIRS) * 2).astype(np.int32),
                  np.zeros(2 * PAIRS, np.int32), np.zeros(2 * PAIRS, np.int32), np.zeros(2 * PAIRS, np.int32),
                  np.full(2 * PAIRS, 2, np.int32), group=2, row_data={"margin": np.repeat(margins, 2)})
    objective = BradleyTerry(coefficient)
    ours, figures = objective.loss(NUMPY, scores, batch)
    accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=accelerator, _tp_size=1,
                              args=SimpleNamespace(center_rewards_coefficient=coefficient or None),
                              _metrics={"eval": defaultdict(list)}, _total_train_tokens=0)
    logits = _trl_order(scores)[:, None]
    inputs = {"input_ids": torch.zeros(2 * PAIRS, 2), "attention_mask": torch.ones(2 * PAIRS, 2),
              "margin": torch.tensor(margins)}
    theirs = RewardTrainer.compute_loss(trainer, lambda **kwargs: SimpleNamespace(logits=logits), inputs)
    assert ours / PAIRS == pytest.approx(theirs.item(), rel=1e-12)
    metrics = trainer._metrics["eval"]
    assert figures[0] / PAIRS == pytest.approx(metrics["accuracy"][0]) and figures[1] / PAIRS == pytest.approx(
        metrics["margin"][0], rel=1e-6)
