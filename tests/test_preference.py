"""Preference tuning (task: preference, task: reward): each loss equals its formula on fixed
log-probabilities on numpy, torch and MLX (gradients too), the two backends agree step by step
(float64 to 1e-9, float32 to 1e-3), a reward model separates held-out pairs, DPO raises held-out
reward accuracy, and bad preference data is refused by one sentence."""

import dataclasses
import json

import numpy as np
import pytest
import yaml
from model_helpers import objective_on_both_frameworks

from twintune.data.batching import Batch, Encoded, make_batch
from twintune.data.preferences import PAIRED, load_rows, synthetic_pairs
from twintune.errors import TwintuneError
from twintune.recipe import recipe_from_dict
from twintune.tasks.objectives import NUMPY
from twintune.tasks.preference import LOSSES, Preference
from twintune.tasks.reward import BradleyTerry
from twintune.train.build import prepare
from twintune.train.evaluate import evaluate
from twintune.train.step import train_step

BACKENDS = ["mlx", "torch"]
DEMO = yaml.safe_load(open("recipes/demo-financial-sentiment.yaml"))


SMALL_LORA = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def _recipe(task, size=200, method=SMALL_LORA, dtype="float32", **train):
    return recipe_from_dict({**DEMO, "task": task, "data": {**DEMO["data"], "synthetic_size": size}, "method": method,
                             "dtype": dtype, "train": {**DEMO["train"], "batch_size": 8, "lr": 3e-3, **train}})


# ---- the formulas --------------------------------------------------------------------------------

def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _pairs_batch(chosen_counts, rejected_counts):
    """A batch of pairs whose rows have these many targets (values are given per target)."""
    counts = np.stack([chosen_counts, rejected_counts], axis=1).reshape(-1)
    width = int(counts.max()) + 1
    positions = np.concatenate([row * width + np.arange(k) for row, k in enumerate(counts)]).astype(np.int32)
    rows = len(counts)
    return Batch(np.zeros((rows, width), np.int32), positions, np.zeros(len(positions), np.int32),
                 np.zeros(rows, np.int32), np.zeros(rows, np.int32), counts.astype(np.int32), group=2)


RNG = np.random.default_rng(7)
N_C, N_R = np.array([3, 1, 2, 4]), np.array([2, 2, 5, 1])
BATCH = _pairs_batch(N_C, N_R)
TOKENS = -RNG.uniform(0.05, 3.0, len(BATCH.targets))  # per-target log-probabilities of the policy
REFERENCE = TOKENS + RNG.normal(0, 0.3, len(TOKENS))
BATCH.reference = REFERENCE


def _rows(values):
    sums = np.bincount(BATCH.target_rows(), weights=values)
    return sums[0::2], sums[1::2]


def _expected(kind, beta=0.1, eps=0.0, gamma=0.5):
    """Each loss written out from its paper / TRL's code (summed over pairs)."""
    c, r = _rows(TOKENS)
    c_ref, r_ref = _rows(REFERENCE)
    delta = (c - c_ref) - (r - r_ref)
    if kind == "dpo":
        losses = -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta)
    elif kind == "ipo":
        losses = (((c - c_ref) / N_C - (r - r_ref) / N_R) - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = np.maximum(0, 1 - beta * delta)
    elif kind == "robust":
        losses = (-(1 - eps) * _log_sigmoid(beta * delta) + eps * _log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    elif kind == "orpo":
        pc, pr = c / N_C, r / N_R
        log_odds = (pc - pr) - (np.log(1 - np.exp(pc)) - np.log(1 - np.exp(pr)))
        losses = -pc - beta * _log_sigmoid(log_odds)
    else:  # simpo
        z = c / N_C - r / N_R - gamma / beta
        losses = -(1 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)
    return losses.sum()


KEYS = [("dpo", {}), ("dpo", {"label_smoothing": 0.2}), ("ipo", {"beta": 0.5}), ("hinge", {"beta": 0.7}),
        ("robust", {"label_smoothing": 0.1}), ("orpo", {"beta": 0.2}), ("simpo", {"beta": 2.0, "simpo_gamma": 0.8})]


@pytest.mark.parametrize("kind,keys", KEYS)
def test_each_loss_equals_its_formula_on_numpy_torch_and_mlx(kind, keys):
    objective = Preference(loss=kind, **keys).objective
    expected = _expected(kind, keys.get("beta", 0.1), keys.get("label_smoothing", 0.0), keys.get("simpo_gamma", 0.5))
    loss, figures = objective.loss(NUMPY, TOKENS, BATCH)
    assert abs(loss - expected) <= 1e-12 * abs(expected)
    assert len(figures) == len(objective.figures)
    # The same objective under both frameworks' autograd, float64: the same value and gradient.
    (torch_loss, torch_grad), (mlx_loss, mlx_grad) = objective_on_both_frameworks(objective, TOKENS, BATCH)
    assert abs(torch_loss - expected) <= 1e-12 * abs(expected)
    assert abs(mlx_loss - expected) <= 1e-12 * abs(expected)
    np.testing.assert_allclose(mlx_grad, torch_grad, rtol=1e-10, atol=1e-14)


def test_the_figures_are_trls_metrics():
    beta = 0.1
    objective = Preference(loss="dpo", beta=beta).objective
    _, figures = objective.loss(NUMPY, TOKENS, BATCH)
    named = dict(zip(objective.figures, figures))
    c, r = _rows(TOKENS)
    c_ref, r_ref = _rows(REFERENCE)
    assert np.isclose(named["rewards/chosen"], (beta * (c - c_ref)).sum())
    assert np.isclose(named["rewards/rejected"], (beta * (r - r_ref)).sum())
    assert named["rewards/accuracies"] == ((c - c_ref) > (r - r_ref)).sum()
    assert np.isclose(named["rewards/margins"], (beta * ((c - c_ref) - (r - r_ref))).sum())
    assert np.isclose(named["logps/chosen"], c.sum()) and np.isclose(named["logps/rejected"], r.sum())


def _kto_batch():
    counts = np.array([3, 1, 2, 4, 2])
    batch = _pairs_batch(counts[:3], np.array([1, 4, 2]))  # six rows of these target counts
    batch.group, batch.labels = 1, np.array([1, 0, 0, 1, 1, 0], np.int32)
    values = -RNG.uniform(0.05, 3.0, len(batch.targets))
    batch.reference = values + RNG.normal(0, 0.3, len(values))
    batch.kl = 0.37
    return batch, values


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_its_formula_on_numpy_torch_and_mlx(weights):
    from twintune.tasks.kto import KTO

    batch, values = _kto_batch()
    beta = 0.2
    objective = KTO(beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1]).objective
    policy = np.bincount(batch.target_rows(), values)
    ratio = policy - np.bincount(batch.target_rows(), batch.reference)
    sigmoid = 1 / (1 + np.exp(-beta * (ratio - 0.37)))
    good = batch.labels == 1
    expected = (weights[0] * (1 - sigmoid[good])).sum() + (weights[1] * (1 - 1 / (1 + np.exp(-beta * (0.37 - ratio[~good]))))).sum()
    loss, figures = objective.loss(NUMPY, values, batch)
    assert abs(loss - expected) < 1e-12
    summary = objective.summarize(np.array([loss, *figures]), 6)
    assert summary["kl"] == pytest.approx(0.37) and summary["rewards/chosen"] == pytest.approx(beta * ratio[good].mean())
    assert summary["logps/rejected"] == pytest.approx(policy[~good].mean())
    assert summary["rewards/margins"] == pytest.approx(beta * (ratio[good].mean() - ratio[~good].mean()))
    (torch_loss, torch_grad), (mlx_loss, mlx_grad) = objective_on_both_frameworks(objective, values, batch)
    assert abs(torch_loss - expected) < 1e-12 and abs(mlx_loss - expected) < 1e-12
    np.testing.assert_allclose(mlx_grad, torch_grad, rtol=1e-10, atol=1e-14)


def test_ktos_z0_is_the_clamped_mean_log_ratio_of_rows_with_the_previous_rows_completion():
    from twintune.tasks.kto import KTO, mismatched_rows

    run = prepare(_recipe({"name": "kto"}), "torch")
    batch = make_batch(run.splits["train"][:3])
    mismatched = mismatched_rows(batch)
    rows = run.splits["train"][:3]
    for i, j in ((0, 2), (1, 0), (2, 1)):  # row i's prompt, row i-1's completion
        expected = np.concatenate([rows[i].ids[:rows[i].prompt_len], rows[j].ids[rows[j].prompt_len:]])
        assert mismatched.input_ids[i, :mismatched.lengths[i]].tolist() == expected[:batch.input_ids.shape[1]].tolist()

    class Model:  # the policy 0.5 above the reference at every target
        gap = 0.5

        def values(self, b, reads, reference=False):
            return np.full(b.n_targets, -1.0 if reference else -1.0 + self.gap)

    z0 = KTO().objective.prepare(batch, Model(), 0).kl
    assert z0 == pytest.approx(0.5 * mismatched.n_targets / 3)
    Model.gap = -0.5  # below: z0 is clamped at 0
    assert KTO().objective.prepare(batch, Model(), 0).kl == 0


@pytest.mark.parametrize("coefficient", [0.0, 0.01])
def test_bradley_terry_with_its_centring_term(coefficient):
    batch = _pairs_batch(np.ones(4, int), np.ones(4, int))
    scores = RNG.normal(0, 2, 8)
    loss, (accuracy, margin, mean) = BradleyTerry(coefficient).loss(NUMPY, scores, batch)
    s_c, s_r = scores[0::2], scores[1::2]
    expected = (-_log_sigmoid(s_c - s_r) + coefficient * (s_c + s_r) ** 2).sum()
    assert abs(loss - expected) < 1e-12 and accuracy == (s_c > s_r).sum()
    assert np.isclose(margin, (s_c - s_r).sum()) and np.isclose(mean, ((s_c + s_r) / 2).sum())


# ---- data ----------------------------------------------------------------------------------------

def _unshared(pairs):
    return [dataclasses.replace(pair, shares_prompt=False) for pair in pairs]


def test_a_pair_is_two_adjacent_rows_with_the_answers_and_end_of_text_as_targets():
    run = prepare(_recipe({"name": "preference"}, method={"name": "prompt"}), "torch")  # virtual tokens: unshared
    pair = run.splits["train"][0]
    assert not pair.shares_prompt
    batch = make_batch([pair, run.splits["train"][1]])
    assert batch.group == 2 and batch.input_ids.shape[0] == 4 and batch.examples == 2 and batch.answers == 4
    tokenizer = run.encoder.tokenizer
    eos = tokenizer.token_to_id("<|endoftext|>")
    for row, encoded in enumerate((pair, pair.rejected)):
        targets = batch.targets[batch.target_rows() == row].tolist()
        assert targets == encoded.ids[encoded.prompt_len:].tolist() and targets[-1] == eos
    assert pair.ids[:pair.prompt_len].tolist() == pair.rejected.ids[:pair.rejected.prompt_len].tolist()


def test_on_gpt_neo_a_pair_is_one_row_its_prompt_once_then_both_answers():
    run = prepare(_recipe({"name": "preference"}), "torch")
    pairs = run.splits["train"][:2]
    assert all(pair.shares_prompt for pair in pairs)
    shared, unshared = make_batch(pairs), make_batch(_unshared(pairs))
    assert shared.input_ids.shape[0] == 2 and shared.examples == 2 and shared.answers == 4
    np.testing.assert_array_equal(shared.targets, unshared.targets)  # the same targets, in the same order
    np.testing.assert_array_equal(shared.target_answers(), unshared.target_rows())
    for row, pair in enumerate(pairs):
        prompt, chosen, rejected = pair.prompt_len, len(pair.ids) - pair.prompt_len, len(pair.rejected.ids) - pair.prompt_len
        length = prompt + chosen + rejected
        assert shared.lengths[row] == length
        np.testing.assert_array_equal(shared.input_ids[row, :length],
                                      np.concatenate([pair.ids, pair.rejected.ids[prompt:]]))
        np.testing.assert_array_equal(shared.positions[row, :length],
                                      np.r_[np.arange(prompt + chosen), prompt + np.arange(rejected)])
        assert shared.segments[row, :length].tolist() == [0] * prompt + [1] * chosen + [2] * rejected
        # each target is predicted by the token before it in its own answer; both answers' first by the prompt's last
        width = shared.input_ids.shape[1]
        for answer, start in ((2 * row, prompt), (2 * row + 1, prompt + chosen)):
            places = shared.target_positions[shared.target_answers() == answer] - row * width
            assert places.tolist() == [prompt - 1] + list(range(start, start + len(places) - 1))


def test_a_processs_share_of_a_batch_is_whole_pairs_with_their_reference():
    from twintune.train.distributed import World, share

    run = prepare(_recipe({"name": "preference"}), "torch")
    for pairs, rows in ((run.splits["train"][:3], (2, 1)), (_unshared(run.splits["train"][:3]), (4, 2))):
        batch = make_batch(pairs)
        batch.reference = -np.arange(batch.n_targets, dtype=np.float64)
        first, second = (share(batch, World(rank, 2)) for rank in range(2))
        assert (first.input_ids.shape[0], second.input_ids.shape[0]) == rows  # pairs 0-1, pair 2
        np.testing.assert_array_equal(np.concatenate([first.reference, second.reference]), batch.reference)
        np.testing.assert_array_equal(second.targets, batch.targets[batch.target_answers() >= 4])
        np.testing.assert_array_equal(second.target_answers(), batch.target_answers()[batch.target_answers() >= 4] - 4)
        assert second.first_row == rows[0] and second.group == 2 and second.examples == 1 and second.answers == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_rows_compute_each_answer_as_its_own_row_does_in_a_local_window_too(backend, tiny_window_dir):
    """float64: the model's hidden states at every target, shared and unshared, through the whole model
    and through the last block at the target rows only (at_rows), on a model whose local window (8)
    is shorter than the rows, so the window counts positions, not places in the row."""
    from model_helpers import hidden_at

    recipe = recipe_from_dict({**_recipe({"name": "preference"}, size=40, dtype="float64").to_dict(),
                               "model": str(tiny_window_dir)})
    run = prepare(recipe, backend)
    pairs = run.splits["train"][:4]
    shared, unshared = make_batch(pairs), make_batch(_unshared(pairs))
    assert shared.input_ids.shape[1] > 8
    some = np.arange(shared.n_targets)[1::2]  # chosen's and rejected's, few enough for at_rows
    assert len(some) <= 2 * shared.input_ids.shape[0]
    for rows in (None, some):
        a, b = hidden_at(run.backend, shared, rows), hidden_at(run.backend, unshared, rows)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,checkpointing", [(SMALL_LORA, False), (SMALL_LORA, True), ({"name": "loreft"}, False),
                                                  ({"name": "full"}, False)],
                         ids=["lora", "lora-checkpointed", "loreft", "full"])
def test_shared_prompts_train_and_evaluate_as_unshared_pairs_do(method, checkpointing):
    """float64, 4 steps with the reference on every step, then held-out figures: running each prompt once
    changes no number (to 1e-12), on both backends (LoReFT's intervention on prompt positions too, and
    with gradient checkpointing's recompute)."""
    for backend in BACKENDS:
        results = {}
        for shared in (True, False):
            run = prepare(_recipe({"name": "preference"}, size=60, method=method, dtype="float64", lr=1e-2,
                                  gradient_checkpointing=checkpointing), backend)
            for split, pairs in run.splits.items():
                assert all(pair.shares_prompt for pair in pairs)
                pairs[:] = pairs if shared else _unshared(pairs)
            assert (run.order.step_batches(0)[0].segments is not None) == shared
            records = [train_step(run, step) for step in range(4)]
            results[shared] = ([r["loss"] for r in records] + [r["rewards/margins"] for r in records],
                               evaluate(run).figures)
        np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-12, atol=1e-14)
        assert results[True][0][3] != results[True][0][0]  # it trained
        for name, value in results[False][1].items():
            assert results[True][1][name] == pytest.approx(value, rel=1e-12, abs=1e-14), (backend, name)


def test_rows_come_from_jsonl_csv_and_parquet_with_trls_names(tmp_path):
    import pandas

    rows = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"}, {"prompt": "R:", "chosen": " up", "rejected": " down"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pandas.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    pandas.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.csv", "p.parquet"):
        assert load_rows(str(tmp_path / name), PAIRED) == rows, name


def test_the_synthetic_pairs_prefer_the_right_sentiment():
    pairs = synthetic_pairs(30, seed=0)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert {p["chosen"] for p in pairs} == {" negative", " neutral", " positive"}
    assert synthetic_pairs(30, seed=0) == pairs and synthetic_pairs(30, seed=1) != pairs


# ---- the step ------------------------------------------------------------------------------------

def test_the_reference_is_the_start_so_the_first_loss_is_log_2_and_the_rewards_zero():
    run = prepare(_recipe({"name": "preference"}), "torch")
    record = train_step(run, 0)
    assert record["loss"] == pytest.approx(np.log(2), abs=1e-7)
    assert record["rewards/chosen"] == 0 and record["rewards/margins"] == 0 and record["logps/chosen"] < 0


def test_gradient_accumulation_equals_one_batch_of_pairs():
    one = prepare(_recipe({"name": "preference"}, dtype="float64", batch_size=8), "torch")
    two = prepare(_recipe({"name": "preference"}, dtype="float64", batch_size=4, grad_accum=2), "torch")
    for step in range(3):
        a, b = train_step(one, step), train_step(two, step)
        assert abs(a["loss"] - b["loss"]) < 1e-12 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-12
    for name, value in one.backend.trainable_state().items():
        np.testing.assert_allclose(two.backend.trainable_state()[name], value, rtol=1e-10, atol=1e-14)


def test_the_estimate_counts_two_rows_a_pair_and_the_references_frozen_copy():
    from twintune.memory import estimate_recipe

    rows, note = estimate_recipe("recipes/demo-dpo.yaml", ["method={name: full}"])
    assert "batch 32 x 128 tokens" in note  # 16 pairs
    assert any(name.startswith("guards") and value > 1.0 for name, value in rows)  # the reference: the start's weights
    rows, note = estimate_recipe("recipes/demo-dpo.yaml", ["method={name: full}", "task={name: preference, loss: orpo}"])
    assert not any(name.startswith("guards") for name, _ in rows)  # ORPO needs no reference


# ---- the reference computed once ----------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "references"


@pytest.mark.parametrize("task", [{"name": "preference"}, {"name": "kto"}], ids=["dpo", "kto"])
def test_a_precomputed_reference_gives_the_live_references_losses_and_is_cached(cache, task):
    live = prepare(_recipe(task, dtype="float64"), "torch")
    once = prepare(_recipe({**task, "precompute_reference": True}, dtype="float64"), "torch")
    assert len(list(cache.iterdir())) == 3  # one file a split
    assert all(row.reference is not None for row in once.splits["train"])
    for step in range(4):
        a, b = train_step(live, step), train_step(once, step)
        assert abs(a["loss"] - b["loss"]) < 1e-12, step
    again = prepare(_recipe({**task, "precompute_reference": True}, dtype="float64"), "torch")  # from the cache
    np.testing.assert_array_equal(again.splits["validation"][0].reference, once.splits["validation"][0].reference)


def test_another_runs_adapter_is_the_reference(cache, tmp_path):
    from twintune.train.loop import train
    from twintune.train.runs import open_run

    first = tmp_path / "sft"
    train(_recipe({"name": "preference"}, max_steps=5, lr=1e-2), "torch", first, progress=False)
    run = prepare(_recipe({"name": "preference", "reference": str(first)}), "torch")
    reference = open_run(first, "torch", with_data=False)
    pair = run.splits["train"][0]
    for row in (pair, pair.rejected):
        alone = make_batch([dataclasses.replace(row, rejected=None, reference=None)])
        np.testing.assert_allclose(row.reference, reference.backend.target_values(alone, "logps"), atol=1e-5)
    assert abs(train_step(run, 0)["loss"] - np.log(2)) > 1e-3  # the policy starts at the base, not at the reference


@pytest.mark.parametrize("task,message", [
    ({"name": "preference", "loss": "orpo", "precompute_reference": True},
     "'task.precompute_reference' sets a reference model, which loss orpo does not use"),
    ({"name": "preference", "reference": "/no/such/run"}, "task.reference /no/such/run is not a run directory"),
])
def test_bad_references_are_refused(cache, task, message):
    with pytest.raises(TwintuneError, match=message):
        prepare(_recipe(task), "torch")


# ---- parity --------------------------------------------------------------------------------------

PARITY_TASKS = [{"name": "preference", "loss": kind} for kind in LOSSES] + [{"name": "reward"}, {"name": "kto"}]
STEPS = 20


def _losses(task, backend, dtype):
    lr = 3e-2 if task["name"] == "reward" else 1e-2  # so that 20 steps visibly train
    run = prepare(_recipe(task, dtype=dtype, max_steps=STEPS, lr=lr, warmup_steps=2), backend)
    records = [train_step(run, step) for step in range(STEPS)]
    return np.array([r["loss"] for r in records]), records[-1], evaluate(run)


@pytest.mark.parametrize("task", PARITY_TASKS, ids=lambda t: t.get("loss", t["name"]))
def test_both_backends_agree_step_by_step_in_float64_and_float32(task):
    for dtype, tolerance in (("float64", 1e-9), ("float32", 1e-3)):
        (mlx, mlx_last, mlx_report), (torch_, torch_last, torch_report) = (
            _losses(task, backend, dtype) for backend in BACKENDS)
        assert torch_[-5:].mean() < torch_[0], "it trained"  # the agreement is not of two idle runs
        rel = np.abs(mlx - torch_) / np.abs(torch_)
        assert rel.max() < tolerance, (dtype, rel.max(), rel.argmax())
        if dtype == "float64":  # the figures too (in float32 a margin's last step may drift past 1e-3 absolute)
            for name, value in torch_last.items():
                if isinstance(value, float) and name not in ("grad_norm", "lr"):
                    assert abs(mlx_last[name] - value) <= tolerance * max(1.0, abs(value)), name
            for name, value in torch_report.figures.items():
                assert abs(mlx_report.figures[name] - value) <= tolerance * max(1.0, abs(value)), name


METHODS = ["lora", "dora", "ia3", "bitfit", "vera", "last_blocks", "full", "adapter", "prompt", "ptuning", "prefix",
           "loreft"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_each_preference_task_alike_on_both_backends(method):
    """float64, 3 steps: the same algorithm on both backends for every method (the reference of a
    method that changes the model from its start, prompt tuning's virtual tokens say, is the base
    without it, as PEFT's disabled adapter is); GRPO's and PPO's samples are drawn through each method."""
    ppo = {"name": "ppo", "reward": UPBEAT, "max_new_tokens": 3}
    grpo = {"name": "grpo", "reward": UPBEAT, "max_new_tokens": 3, "group_size": 2, "beta": 0.04}
    for task in ({"name": "preference"}, {"name": "kto"}, {"name": "reward"}, ppo, grpo):
        losses, records = {}, {}
        for backend in BACKENDS:
            run = prepare(_recipe(task, size=60, method={"name": method}, dtype="float64", lr=1e-3), backend)
            records[backend] = [train_step(run, step) for step in range(3)]
            losses[backend] = np.array([r["loss"] for r in records[backend]])
        # (GRPO's loss is a mean of advantages that cancel within each group, ~1e-17 at first: 1e-12 absolute)
        assert np.abs(losses["mlx"] - losses["torch"]).max() <= max(1e-9 * np.abs(losses["torch"]).max(), 1e-12), \
            (task, losses)
        assert losses["torch"][2] != losses["torch"][0], task  # the method trained
        if task is grpo:  # the same samples, and the KL to the base view that they moved
            assert [r["reward"] for r in records["mlx"]] == [r["reward"] for r in records["torch"]]
            kl = np.array([[r["kl"] for r in records[b]] for b in BACKENDS])
            # (e^x - x - 1 of x ~ 1e-4 cancels down to ~1e-16 absolute in float64, on any framework)
            assert kl[1, 2] > 0 and np.abs(kl[0] - kl[1]).max() <= max(1e-9 * kl[1].max(), 1e-15), kl


def test_nf4_bases_train_each_preference_task_alike_on_both_backends():
    """The shared NF4 codes dequantize to the same numbers on both backends: float32 to 1e-5 over 10 steps
    (measured 3.4e-7)."""
    for task in ({"name": "preference"}, {"name": "kto"}, {"name": "reward"},
                 {"name": "ppo", "reward": UPBEAT, "max_new_tokens": 4}):
        losses = {}
        for backend in BACKENDS:
            recipe = recipe_from_dict({**_recipe(task, size=100).to_dict(), "quantize": {"type": "nf4"}})
            run = prepare(dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps=10)), backend)
            losses[backend] = np.array([train_step(run, step)["loss"] for step in range(10)])
        assert np.abs(losses["mlx"] - losses["torch"]).max() / np.abs(losses["torch"]).max() < 1e-5, task


# ---- GRPO ----------------------------------------------------------------------------------------

UPBEAT = "python:twintune.rewards.upbeat"


def length_reward(prompts, completions, label, **columns):
    """A test reward: the completion's length in characters, 100 more when the prompt's label is positive."""
    assert len(label) == len(completions)
    return [len(c) + (100.0 if lab == "positive" else 0.0) for c, lab in zip(completions, label)]


def wrong_shape(prompts, completions, **columns):
    return [1.0]


class FixedModel:
    """Samples completions of k + 1 tokens for the k-th draw of a prompt; decodes ids as text of that length."""

    eos_id = 0

    def sample(self, prompts, max_tokens, temperature, top_p, seeds):
        return [self.one() for _ in prompts]

    def one(self):
        self.draws = getattr(self, "draws", 0) + 1
        return [7] * (1 + (self.draws - 1) % 4)

    def decode(self, ids):
        return "x" * len(ids)


def test_grpos_advantages_are_each_completions_reward_against_its_group():
    from twintune.tasks.grpo import GRPO

    prompts = make_batch([Encoded(np.array([1, 2, 3], np.int32), 3, 0, columns={"label": "positive"}),
                          Encoded(np.array([4, 5], np.int32), 2, 0, columns={"label": "neutral"})])
    objective = GRPO(reward="python:test_preference.length_reward", group_size=4).objective
    batch = objective.prepare(prompts, FixedModel(), 0)
    rewards = np.array([101, 102, 103, 104, 1, 2, 3, 4], float)
    np.testing.assert_array_equal(batch.row_data["rewards"], rewards)
    groups = rewards.reshape(2, 4)
    expected = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(batch.row_data["advantages"], expected.reshape(-1))
    assert batch.group == 4 and batch.input_ids.shape[0] == 8 and batch.n_targets == 2 * (1 + 2 + 3 + 4)
    assert batch.input_ids[5, :4].tolist() == [4, 5, 7, 7]  # the prompt, then its completion
    # the loss: -A per completion token (the ratio is 1), summed; GRPOLoss.count is the tokens
    loss, _ = objective.loss(NUMPY, np.zeros(batch.n_targets), batch)
    assert loss == pytest.approx(-(np.repeat(batch.row_data["advantages"], [1, 2, 3, 4] * 2)).sum())


@pytest.mark.parametrize("keys,message", [
    ({"reward": "python:no_such_module.f"}, "module 'no_such_module' cannot be imported"),
    ({"reward": "python:twintune.rewards.nothing"}, "module 'twintune.rewards' has no 'nothing'"),
    ({"reward": "twintune.rewards.upbeat"}, "task.reward must name a function as python:module.function"),
    ({}, "task grpo needs one reward"),
    ({"reward": UPBEAT, "group_size": 1}, "'task.group_size' must be 2 or more"),
])
def test_bad_grpo_keys_are_refused(keys, message):
    with pytest.raises(TwintuneError, match=message):
        _recipe({"name": "grpo", **keys})


def test_a_reward_of_the_wrong_shape_is_one_sentence():
    run = prepare(_recipe({"name": "grpo", "reward": "python:test_preference.wrong_shape", "max_new_tokens": 2}),
                  "torch")
    with pytest.raises(TwintuneError, match=r"must return one finite number for each of the 32 completions it is "
                                            r"given; it returned a list of 1"):
        train_step(run, 0)


def _grpo_steps(backend, dtype, steps=20, **keys):
    task = {"name": "grpo", "reward": UPBEAT, "max_new_tokens": 6, **keys}
    run = prepare(_recipe(task, size=100, dtype=dtype, max_steps=steps, lr=1e-2, warmup_steps=1), backend)
    return [train_step(run, step) for step in range(steps)]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_samples_the_same_completions_and_agrees_on_both_backends(beta):
    for dtype, tolerance, relative in (("float64", 1e-12, 1e-9), ("float32", 1e-6, 1e-3)):
        mlx, torch_ = (_grpo_steps(backend, dtype, beta=beta) for backend in BACKENDS)
        for a, b in zip(mlx, torch_):
            assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"], (dtype, a, b)
            assert a["tokens"] == b["tokens"]
            assert abs(a["loss"] - b["loss"]) < tolerance, (dtype, a["loss"], b["loss"])
            if beta:
                assert abs(a["kl"] - b["kl"]) < max(tolerance, relative * abs(b["kl"])), dtype  # a small e^x - x - 1
        assert len({r["reward"] for r in torch_}) > 1  # it sampled something worth agreeing on


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    from twintune.train.loop import train

    out = tmp_path_factory.mktemp("reward") / "run"
    train(_recipe({"name": "reward"}, max_steps=10, lr=3e-2), "torch", out, progress=False)
    return out


def test_grpo_scores_completions_with_a_reward_run_alike_on_both_backends(reward_run):
    from twintune.train.runs import open_run
    from twintune.train.step import RunModel

    records = {}
    for backend in BACKENDS:
        run = prepare(_recipe({"name": "grpo", "reward_model": str(reward_run), "max_new_tokens": 4}, size=60,
                              dtype="float64"), backend)
        records[backend] = [train_step(run, step) for step in range(3)]
    for a, b in zip(records["mlx"], records["torch"]):
        assert abs(a["reward"] - b["reward"]) < 1e-9 and abs(a["loss"] - b["loss"]) < 1e-12
    # the scores are the reward run's own: its head at the last token of prompt + completion
    rows = [[5, 6, 7, 8], [9, 10]]
    scored = RunModel(run).reward_scores(rows)
    own = open_run(reward_run, "torch", with_data=False).backend
    for ids, score in zip(rows, scored):
        batch = make_batch([Encoded(np.array(ids, np.int32), len(ids), 0, class_target=True)])
        assert score == pytest.approx(float(own.target_values(batch, "scores")[0]), abs=1e-5)


def test_a_reward_model_must_be_a_reward_run_with_this_tokenizer(reward_run, tmp_path):
    import shutil

    from twintune.formats.tiny_model import builtin_model_dir
    from twintune.train.loop import train

    dpo = tmp_path / "dpo"
    train(_recipe({"name": "preference"}, max_steps=2), "torch", dpo, progress=False)
    with pytest.raises(TwintuneError, match="is a preference run; a reward model is a run of task reward"):
        prepare(_recipe({"name": "grpo", "reward_model": str(dpo)}), "torch")
    other = tmp_path / "other-tokenizer"  # the same weights, a tokenizer with one more token
    shutil.copytree(builtin_model_dir("tiny-gpt-neo"), other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][0], "id": 1023, "content": "<|other|>"})
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    recipe = json.loads((reward_run / "recipe.json").read_text())
    foreign = tmp_path / "foreign-reward"
    shutil.copytree(reward_run, foreign)
    (foreign / "recipe.json").write_text(json.dumps({**recipe, "model": str(other)}))
    with pytest.raises(TwintuneError, match="reads text with another tokenizer"):
        prepare(_recipe({"name": "grpo", "reward_model": str(foreign)}), "torch")


def test_the_offline_rlhf_chain_runs_each_stage_on_the_previous_stages_run(tmp_path):
    """recipes/rlhf-*.yaml as their comments say, from a working directory of their own: supervised
    tuning, merge, a reward model on the merged model, PPO (and GRPO) scored by that reward model; each
    stage names the previous one's run (here a few steps each)."""
    import os
    import subprocess
    import sys

    repo = os.getcwd()
    quick = ["--backend", "torch", "--no-progress", "--set", "train.max_steps=3", "--set", "data.synthetic_size=120"]

    def twintune(*argv):
        result = subprocess.run([sys.executable, "-m", "twintune", *argv], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    twintune("train", f"{repo}/recipes/rlhf-1-sft.yaml", "--out", "runs/rlhf-1-sft", *quick)
    twintune("merge", "runs/rlhf-1-sft", "--out", "runs/rlhf-1-sft-merged")
    twintune("train", f"{repo}/recipes/rlhf-2-reward.yaml", "--out", "runs/rlhf-2-reward", *quick)
    twintune("train", f"{repo}/recipes/rlhf-3-grpo.yaml", "--out", "runs/rlhf-3-grpo", *quick)
    twintune("train", f"{repo}/recipes/rlhf-3-ppo.yaml", "--out", "runs/rlhf-3-ppo", *quick)
    reward = json.loads((tmp_path / "runs/rlhf-2-reward/summary.json").read_text())
    grpo = json.loads((tmp_path / "runs/rlhf-3-grpo/summary.json").read_text())
    ppo = json.loads((tmp_path / "runs/rlhf-3-ppo/summary.json").read_text())
    assert "val_accuracy" in reward and "val_reward" in grpo and grpo["model"] == "runs/rlhf-1-sft-merged"
    assert "val_objective/scores" in ppo and ppo["model"] == "runs/rlhf-1-sft-merged"
    for stage in ("runs/rlhf-3-grpo", "runs/rlhf-3-ppo"):
        assert "Sentiment:" in twintune("generate", stage, "Sentence: Sales rose .\nSentiment:", "--max-tokens", "2")


# ---- learning ------------------------------------------------------------------------------------

def test_a_reward_model_separates_held_out_pairs():
    run = prepare(_recipe({"name": "reward", "center_rewards_coefficient": 0.01}, size=3000, method=DEMO["method"],
                          epochs=4, batch_size=16), "torch")  # 600 steps of 16 pairs
    for step in range(run.total_steps):
        train_step(run, step)
    report = evaluate(run)
    assert report.figures["accuracy"] >= 0.9, report.figures  # measured 0.947
    assert abs(report.figures["mean_reward"]) < 1.0  # the centring term keeps the scores near zero


def test_dpo_raises_held_out_reward_accuracy_and_the_policys_own_preference():
    run = prepare(_recipe({"name": "preference", "loss": "dpo"}, size=1500, method=DEMO["method"], epochs=2,
                          batch_size=16), "torch")  # 150 steps of 16 pairs
    before = evaluate(run).figures
    for step in range(run.total_steps):
        train_step(run, step)
    after = evaluate(run).figures
    assert before["rewards/accuracies"] == 0 and after["rewards/accuracies"] >= 0.8, after  # measured 0.87
    # the policy itself now prefers the chosen answers by far more than the base did
    assert after["logps/chosen"] - after["logps/rejected"] > before["logps/chosen"] - before["logps/rejected"] + 3


def test_kto_separates_held_out_desirable_from_undesirable_answers():
    run = prepare(_recipe({"name": "kto"}, size=1500, method=DEMO["method"], epochs=2, batch_size=16), "torch")
    before = evaluate(run).figures
    for step in range(run.total_steps):
        train_step(run, step)
    after = evaluate(run).figures
    assert before["rewards/margins"] == 0 and before["loss"] == pytest.approx(0.5)
    assert after["rewards/margins"] > 1.5 and after["loss"] < 0.35, after  # measured 2.25 and 0.30


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_raises_the_held_out_reward_and_beta_keeps_the_kl_bounded(beta):
    task = {"name": "grpo", "reward": UPBEAT, "max_new_tokens": 8, "beta": beta}
    run = prepare(_recipe(task, size=300, method=DEMO["method"], batch_size=4, max_steps=60, warmup_steps=10), "torch")
    before = evaluate(run).figures
    records = [train_step(run, step) for step in range(run.total_steps)]
    after = evaluate(run).figures
    assert after["reward"] > before["reward"] + 0.15, (before, after)  # measured 0.075 -> 0.58 and 0.54
    if beta:
        assert 0 < after["kl"] < 0.5 and max(r["kl"] for r in records) < 0.5, after  # measured 0.19


# ---- refusals ------------------------------------------------------------------------------------

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_bad_preference_data_is_refused_by_one_sentence(tmp_path):
    missing = _jsonl(tmp_path / "m.jsonl", [{"prompt": "Q:", "answer": " yes", "rejected": " no"}])
    with pytest.raises(TwintuneError, match=r"has no column 'chosen' \(its columns are prompt, answer, rejected\)"):
        load_rows(missing, PAIRED)
    same = _jsonl(tmp_path / "s.jsonl", [{"prompt": "Q:", "chosen": " yes", "rejected": " yes"}] * 10)
    with pytest.raises(TwintuneError, match="row 1 of .*chosen equals rejected"):
        prepare(recipe_from_dict({**DEMO, "task": {"name": "preference"}, "data": {"source": same}}), "torch")
    long = _jsonl(tmp_path / "l.jsonl", [{"prompt": "word " * 200, "chosen": " yes", "rejected": " no"}] * 10)
    with pytest.raises(TwintuneError, match="its prompt is .* tokens, leaving no room for an answer"):
        prepare(recipe_from_dict({**DEMO, "task": {"name": "preference"}, "data": {"source": long, "max_length": 64}}),
                "torch")
    chat = _jsonl(tmp_path / "c.jsonl", [{"prompt": "Q:", "chosen": [{"role": "assistant", "content": "yes"}],
                                          "rejected": " no"}])
    with pytest.raises(TwintuneError, match="column 'chosen' holds chat messages, and this model's tokenizer has no"):
        load_rows(chat, PAIRED)


def test_kto_with_one_label_only_is_refused(tmp_path):
    rows = _jsonl(tmp_path / "k.jsonl", [{"prompt": "Q:", "completion": " yes", "label": True}] * 10)
    with pytest.raises(TwintuneError, match="every row of .* is labelled desirable .true.; KTO weighs desirable against"):
        prepare(recipe_from_dict({**DEMO, "task": {"name": "kto"}, "data": {"source": rows}}), "torch")


@pytest.mark.parametrize("keys,message", [
    ({"beta": 0}, "'task.beta' must be above 0"), ({"beta": -1}, "'task.beta' must be above 0"),
    ({"loss": "kto2"}, "'task.loss' must be one of dpo, ipo"), ({"label_smoothing": 0.5}, "label_smoothing' must be in"),
])
def test_bad_preference_keys_are_refused(keys, message):
    with pytest.raises(TwintuneError, match=message):
        _recipe({"name": "preference", **keys})


# ---- PEFT interop --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reward_adapter_loads_in_peft_as_seq_cls_with_one_label_and_scores_alike(backend, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import GPTNeoForSequenceClassification

    from twintune.formats.adapter import save_adapter

    run = prepare(_recipe({"name": "reward"}, lr=3e-2, max_steps=5), backend)
    for step in range(5):
        train_step(run, step)
    state = run.backend.trainable_state()
    adapter = save_adapter(tmp_path / "adapter", run.method, state, run.recipe.model, labels=["reward"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = GPTNeoForSequenceClassification.from_pretrained(str(run.model_dir), num_labels=1, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    pairs = run.splits["validation"][:3]
    ours = run.backend.target_values(make_batch(pairs), "scores")  # chosen, rejected, chosen, ...
    for i, row in enumerate(r for pair in pairs for r in (pair, pair.rejected)):
        with torch.no_grad():  # one row at a time: GPT-Neo has no pad token, so the last token is scored
            theirs = peft_model(torch.tensor(row.ids[None], dtype=torch.long)).logits[0, 0].item()
        assert theirs == pytest.approx(float(ours[i]), abs=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_peft_seq_cls_reward_adapter_with_one_label_gives_peft_scores(backend, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoForSequenceClassification

    from twintune.api import load
    from twintune.formats.tiny_model import builtin_model_dir

    torch.manual_seed(0)
    base = GPTNeoForSequenceClassification.from_pretrained(str(builtin_model_dir("tiny-gpt-neo")), num_labels=1,
                                                           dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"])).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ids = [[833, 375, 420, 17, 99], [5, 6, 7]]
    model = load("builtin:tiny-gpt-neo", adapter=tmp_path / "adapter", backend=backend, labels=["reward"])
    for row in ids:
        with torch.no_grad():
            theirs = peft_model(torch.tensor([row])).logits[0, 0].item()
        assert model.logits([row])[0, -1, 0] == pytest.approx(theirs, abs=2e-5)


def test_a_reward_models_margin_column_is_read_and_raises_its_loss(tmp_path):
    rows = [{**row, "margin": 1.0} for row in synthetic_pairs(60, seed=0)]
    with_margin = _jsonl(tmp_path / "m.jsonl", rows)
    without = _jsonl(tmp_path / "n.jsonl", [{k: v for k, v in row.items() if k != "margin"} for row in rows])
    losses = {}
    for name, source in (("margin", with_margin), ("none", without)):
        run = prepare(recipe_from_dict({**_recipe({"name": "reward"}).to_dict(), "data": {"source": source}}), "torch")
        losses[name] = train_step(run, 0)["loss"]
        if name == "margin":
            assert run.order.step_batches(0)[0].row_data["margin"].tolist() == [1.0] * 16  # on both rows of a pair
    assert losses["margin"] > losses["none"]  # -log σ(x - 1) > -log σ(x)
    bad = _jsonl(tmp_path / "b.jsonl", [{**rows[0], "margin": "big"}, *rows[1:]])
    with pytest.raises(TwintuneError, match="row 1 has margin 'big'; it must be a finite number"):
        load_rows(bad, PAIRED, numbers=("margin",))
