"""PPO (task: ppo): the rollout's rewards, advantages and returns and the clipped losses equal their
formulas written here (numpy, torch and MLX; gradients too), rollouts are sampled and regrouped as
documented and survive a checkpoint, both backends sample the same completions and agree step by
step (float64 to 1e-9, float32 to 1e-3), PPO raises the held-out reward with the KL to the reference
bounded, and bad keys are refused by one sentence."""

import json

import numpy as np
import pytest
import yaml
from model_helpers import objective_on_both_frameworks

from twintune.data.batching import Encoded, make_batch
from twintune.errors import TwintuneError
from twintune.recipe import recipe_from_dict
from twintune.tasks.objectives import NUMPY
from twintune.tasks.ppo import PPO, discounted_advantages, whiten
from twintune.train.build import prepare
from twintune.train.evaluate import evaluate
from twintune.train.step import train_step

BACKENDS = ["mlx", "torch"]
DEMO = yaml.safe_load(open("recipes/demo-financial-sentiment.yaml"))
UPBEAT = "python:twintune.rewards.upbeat"
SMALL_LORA = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _recipe(task, size=100, method=SMALL_LORA, dtype="float32", **train):
    return recipe_from_dict({**DEMO, "task": {"name": "ppo", "reward": UPBEAT, "max_new_tokens": 6, **task},
                             "data": {**DEMO["data"], "synthetic_size": size, "max_length": 64}, "method": method,
                             "dtype": dtype, "train": {**DEMO["train"], "batch_size": 4, "lr": 3e-3, **train}})


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


# ---- the formulas --------------------------------------------------------------------------------

def test_whitening_is_trls_masked_whiten():
    values = np.array([0.3, -1.2, 2.5, 0.0, 0.7])
    mean = values.mean()
    variance = ((values - mean) ** 2).sum() / (len(values) - 1)  # torch's unbiased variance
    np.testing.assert_allclose(whiten(values), (values - mean) / np.sqrt(variance + 1e-8), rtol=1e-14)
    np.testing.assert_allclose(whiten(values, shift_mean=False), (values - mean) / np.sqrt(variance + 1e-8) + mean,
                               rtol=1e-14)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_is_the_discounted_sum_of_td_errors(gamma, lam):
    rng = np.random.default_rng(3)
    rewards, values = rng.normal(size=6), rng.normal(size=6)
    following = np.append(values[1:], 0.0)  # V after the last token is 0
    deltas = rewards + gamma * following - values
    expected = [sum((gamma * lam) ** k * deltas[t + k] for k in range(6 - t)) for t in range(6)]
    np.testing.assert_allclose(discounted_advantages(rewards, values, gamma, lam), expected, rtol=1e-12, atol=1e-14)


class FixedModel:
    """A model whose draws, values and scores are fixed: the k-th completion is k + 1 tokens of 7 (the
    second ends with end-of-text, 0); per target, log-probability -0.1 t, value 0.2 t, reference -0.15 t."""

    eos_id = 0

    def sample(self, prompts, max_tokens, temperature, top_p, seeds):
        return [self.one() for _ in prompts]

    def one(self):
        self.draws = getattr(self, "draws", 0) + 1
        return [7] * self.draws + ([0] if self.draws == 2 else [])

    def decode(self, ids):
        return "x" * len(ids)

    def values(self, batch, reads, reference=False, temperature=1.0):
        t = np.arange(1, batch.n_targets + 1, dtype=float)
        if reference:
            return -0.15 * t
        return np.stack([-0.1 * t, 0.2 * t], axis=1) if reads == "logps_values" else -0.1 * t


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_a_rollouts_rewards_advantages_and_returns_are_the_formulas(estimator):
    task = PPO(reward="python:test_ppo.length_reward", kl_coef=0.2, kl_estimator=estimator, gamma=0.9, lam=0.8,
               missing_eos_penalty=0.5)
    prompts = make_batch([Encoded(np.array([1, 2, 3], np.int32), 3, 0), Encoded(np.array([4, 5], np.int32), 2, 0)])
    batch = task.objective.prepare(prompts, FixedModel(), 0)
    assert batch.input_ids[0, :4].tolist() == [1, 2, 3, 7] and batch.input_ids[1, :5].tolist() == [4, 5, 7, 7, 0]
    t = np.arange(1, 5, dtype=float)
    old, value, ref = -0.1 * t, 0.2 * t, -0.15 * t
    gap = ref - old
    kl = -gap if estimator == "k1" else np.exp(gap) - 1 - gap
    scores = np.array([1.0 - 0.5, 3.0])  # one token, did not end: penalised; "xxx" ended with end-of-text
    np.testing.assert_allclose(batch.row_data["scores"], scores)
    rewards = -0.2 * kl
    rewards[[0, 3]] += scores  # each completion's last token
    gae = np.concatenate([discounted_advantages(rewards[:1], value[:1], 0.9, 0.8),
                          discounted_advantages(rewards[1:], value[1:], 0.9, 0.8)])
    np.testing.assert_allclose(batch.target_data["returns"], gae + value, rtol=1e-12)
    np.testing.assert_allclose(batch.target_data["advantages"], whiten(gae), rtol=1e-12)
    np.testing.assert_allclose(batch.reference, ref)
    np.testing.assert_allclose(batch.row_data["kl"], [kl[0], kl[1:].sum()], rtol=1e-12)


def _loss_batch():
    rng = np.random.default_rng(11)
    batch = make_batch([Encoded(np.arange(1, 1 + n, dtype=np.int32), 2, 0) for n in (5, 3, 6)])
    n = batch.n_targets
    batch.target_data = {"old_logps": -rng.uniform(0.1, 2, n), "old_values": rng.normal(size=n),
                         "advantages": rng.normal(size=n), "returns": rng.normal(size=n)}
    batch.row_data = {"scores": rng.normal(size=3), "kl": rng.uniform(0, 1, 3)}
    values = np.stack([batch.target_data["old_logps"] + rng.normal(0, 0.3, n),
                       batch.target_data["old_values"] + rng.normal(0, 0.4, n)], axis=1)
    return batch, values


def test_the_clipped_losses_equal_their_formulas_on_numpy_torch_and_mlx():
    batch, values = _loss_batch()
    task = PPO(reward=UPBEAT, cliprange=0.2, cliprange_value=0.3, vf_coef=0.1)
    d = batch.target_data
    ratio = np.exp(values[:, 0] - d["old_logps"])
    policy = np.maximum(-d["advantages"] * ratio, -d["advantages"] * np.clip(ratio, 0.8, 1.2))
    near = d["old_values"] + np.clip(values[:, 1] - d["old_values"], -0.3, 0.3)
    value = 0.5 * np.maximum((values[:, 1] - d["returns"]) ** 2, (near - d["returns"]) ** 2)
    expected = policy.sum() + 0.1 * value.sum()
    objective = task.objective
    loss, figures = objective.loss(NUMPY, values, batch)
    assert abs(loss - expected) <= 1e-12 * abs(expected)
    assert 0 < (ratio > 1.2).sum() + (ratio < 0.8).sum() < len(ratio)  # both sides of the clip are exercised
    summary = objective.summarize(np.array([loss, *map(float, figures)]), batch.n_targets)
    assert summary["loss/policy_avg"] == pytest.approx(policy.mean())
    assert summary["loss/value_avg"] == pytest.approx(value.mean())
    assert summary["objective/scores"] == pytest.approx(batch.row_data["scores"].mean())
    assert summary["objective/rlhf_reward"] == pytest.approx(
        batch.row_data["scores"].mean() - task.kl_coef * batch.row_data["kl"].mean())
    assert summary["val/ratio"] == pytest.approx(ratio.mean())
    (torch_loss, torch_grad), (mlx_loss, mlx_grad) = objective_on_both_frameworks(objective, values, batch)
    assert abs(torch_loss - expected) < 1e-12 and abs(mlx_loss - expected) < 1e-12
    np.testing.assert_allclose(mlx_grad, torch_grad, rtol=1e-10, atol=1e-14)
    # the gradient of the policy term is -A ρ where ρ is inside the clip or on the advantage's good side
    active = (ratio == np.clip(ratio, 0.8, 1.2)) | (-d["advantages"] * ratio > -d["advantages"] * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(torch_grad[:, 0], np.where(active, -d["advantages"] * ratio, 0.0), atol=1e-12)


# ---- rollouts ------------------------------------------------------------------------------------

def test_a_rollout_takes_its_prompts_once_and_each_epoch_regroups_them():
    from twintune.train.step import RunModel

    run = prepare(_recipe({"num_ppo_epochs": 3, "num_mini_batches": 2}, max_steps=12, grad_accum=2), "torch")
    assert run.recipe.task.steps_per_rollout == 6
    model = RunModel(run)
    prompts = {tuple(b.input_ids[j, :b.lengths[j]]) for step in (0, 1) for b in run.order.step_batches(step)
               for j in range(b.input_ids.shape[0])}
    seen = []
    for step in range(6):  # one rollout: 3 epochs of 2 minibatches, each 2 micro-batches of 4 rows
        batches = run.rollouts.step_batches(step, model)
        assert [b.input_ids.shape[0] for b in batches] == [4, 4] and run.rollouts.index == 0
        seen.append({tuple(b.input_ids[j, :b.lengths[j]]) for b in batches for j in range(4)})
    for epoch in range(3):
        rows = seen[2 * epoch] | seen[2 * epoch + 1]
        assert len(rows) == 16 and {row[:len(p)] for row in rows for p in prompts if row[:len(p)] == p} == prompts
    assert seen[0] != seen[2]  # another epoch, another grouping
    run.rollouts.step_batches(6, model)
    assert run.rollouts.index == 1 and run.total_steps == 12


def test_a_rollout_survives_its_checkpoint_arrays():
    from twintune.train.rollouts import Rollouts
    from twintune.train.step import RunModel

    run = prepare(_recipe({}, max_steps=4), "torch")
    before = run.rollouts.step_batches(1, RunModel(run))
    again = Rollouts(run.recipe.task, run.order, 4, run.recipe.seed)
    again.load(run.rollouts.state())
    after = again.step_batches(1, None)  # no model needed: the rollout is there
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.reference, b.reference)
        for key in a.target_data:
            np.testing.assert_array_equal(a.target_data[key], b.target_data[key])
        for key in a.row_data:
            np.testing.assert_array_equal(a.row_data[key], b.row_data[key])


# ---- both backends -------------------------------------------------------------------------------

def _ppo_steps(backend, dtype, steps=20, **keys):
    run = prepare(_recipe({"num_ppo_epochs": 2, "num_mini_batches": 2, **keys}, dtype=dtype, max_steps=steps,
                          warmup_steps=1), backend)
    return [train_step(run, step) for step in range(steps)]


def test_ppo_samples_the_same_completions_and_agrees_on_both_backends():
    for dtype, tolerance in (("float64", 1e-9), ("float32", 1e-3)):
        mlx, torch_ = (_ppo_steps(backend, dtype) for backend in BACKENDS)
        for a, b in zip(mlx, torch_):
            assert a["objective/scores"] == b["objective/scores"] and a["tokens"] == b["tokens"], (dtype, a, b)
            for key in ("loss", "loss/value_avg", "objective/kl", "val/ratio"):
                # the KL is a small difference of log-probabilities, each rounded alone: 1e-2 absolute floor
                assert abs(a[key] - b[key]) <= tolerance * max(abs(b[key]), 1e-2), (dtype, key, a[key], b[key])
        assert len({r["objective/scores"] for r in torch_}) > 1 and torch_[-1]["objective/kl"] != 0  # k1: either sign


def test_ppo_scores_with_a_reward_run_alike_on_both_backends(tmp_path):
    from twintune.train.loop import train

    reward = tmp_path / "reward"
    train(recipe_from_dict({**DEMO, "task": {"name": "reward"}, "method": SMALL_LORA,
                            "data": {**DEMO["data"], "synthetic_size": 100},
                            "train": {**DEMO["train"], "max_steps": 4, "batch_size": 8}}), "torch", reward,
          progress=False)
    records = {}
    for backend in BACKENDS:
        run = prepare(_recipe({"reward": "", "reward_model": str(reward)}, dtype="float64", max_steps=4), backend)
        records[backend] = [train_step(run, step) for step in range(4)]
    for a, b in zip(records["mlx"], records["torch"]):
        assert abs(a["objective/scores"] - b["objective/scores"]) < 1e-9 and abs(a["loss"] - b["loss"]) < 1e-9


# ---- learning ------------------------------------------------------------------------------------

def _learn(kl_coef):
    run = prepare(_recipe({"max_new_tokens": 8, "temperature": 1.0, "kl_coef": kl_coef}, size=600,
                          method=DEMO["method"], batch_size=16, lr=2e-3, max_steps=80, warmup_steps=4), "torch")
    before = evaluate(run).figures
    records = [train_step(run, step) for step in range(run.total_steps)]
    return before, evaluate(run).figures, records


def test_ppo_raises_the_held_out_reward_and_its_penalty_bounds_the_kl():
    before, after, records = _learn(0.1)
    assert after["objective/scores"] > before["objective/scores"] + 0.25, (before, after)  # measured -0.03 -> 0.48
    assert after["objective/kl"] < 3.0 and max(r["objective/kl"] for r in records) < 3.0, after  # 1.89 (8 tokens)
    _, held, _ = _learn(0.3)
    assert held["objective/kl"] < 0.75 * after["objective/kl"], (held, after)  # measured 1.07 against 1.89


# ---- files and refusals --------------------------------------------------------------------------

def test_the_value_head_is_saved_beside_the_adapter_with_trls_names(tmp_path):
    from twintune.formats.safetensors_io import read_safetensors
    from twintune.train.loop import train
    from twintune.train.runs import open_run

    out = tmp_path / "ppo"
    train(_recipe({}, max_steps=2), "torch", out, progress=False)
    saved = read_safetensors(out / "adapter" / "value_head.safetensors")
    assert sorted(saved) == ["v_head.summary.bias", "v_head.summary.weight"]
    assert saved["v_head.summary.weight"].shape == (1, 64)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config.get("modules_to_save")
    run = open_run(out, "mlx", with_data=False)  # the value head loads back, on the other backend too
    np.testing.assert_array_equal(run.backend.trainable_state()["v_head.weight"], saved["v_head.summary.weight"])
    # PEFT reads the adapter as any LoRA adapter (the value head's file beside it is not its concern)
    from model_helpers import hf_model, torch_logits
    from peft import PeftModel

    ids = np.array([[5, 9, 30, 2, 77, 4]], np.int32)
    theirs = torch_logits(PeftModel.from_pretrained(hf_model(run.model_dir), str(out / "adapter")), ids)
    np.testing.assert_allclose(run.backend.logits(ids), theirs, atol=1e-4 * np.abs(theirs).max())


@pytest.mark.parametrize("keys,message", [
    ({"reward": ""}, "task ppo needs one reward"),
    ({"kl_estimator": "k2"}, "'task.kl_estimator' must be k1 or k3"),
    ({"lam": 1.5}, r"'task.lam' must be in \[0, 1\]"),
    ({"cliprange": 0}, "'task.cliprange' must be above 0"),
    ({"num_ppo_epochs": 0}, "'task.num_ppo_epochs' must be 1 or more"),
    ({"group_size": 4}, "recipe key 'task.group_size' belongs to task grpo, not to ppo"),
])
def test_bad_ppo_keys_are_refused(keys, message):
    with pytest.raises(TwintuneError, match=message):
        _recipe(keys)


def test_the_estimate_counts_the_value_head_and_the_rollout(tmp_path):
    from twintune.memory import estimate_recipe

    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe({}).to_dict(), "train": {**DEMO["train"], "batch_size": 16}}))
    rows, note = estimate_recipe(str(recipe), backend="torch")
    assert dict(rows)["PPO rollout"] * 2**20 == 16 * 64 * (8 + 5 * 8)  # 16 rows of 64 tokens: ids, 5 numbers a token
    grpo = ["task={name: grpo, reward: 'python:twintune.rewards.upbeat'}"]
    grpo_rows, grpo_note = estimate_recipe(str(recipe), grpo, backend="torch")
    assert "PPO rollout" not in dict(grpo_rows)
    assert _trainable(note) == _trainable(grpo_note) + 64 + 1  # the value head: a (1 x 64) weight and a bias


def _trainable(note):
    return int(note.split(" trainable)")[0].rsplit("(", 1)[1].replace(",", ""))
