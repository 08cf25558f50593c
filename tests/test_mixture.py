"""Multi-task mixtures (data.mixture): sources drawn by weight into every step, each read in its own
seeded order, any step addressable (so resume is exact), each source's validation figures beside the
whole's, and the same losses on both backends."""

import json

import numpy as np
import pytest

from twintune.data.batching import Encoded
from twintune.data.mixture import MixtureOrder
from twintune.errors import TwintuneError
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate
from twintune.train.loop import train

DEMO = "recipes/demo-financial-sentiment.yaml"


def examples(tag: int, n: int) -> list[Encoded]:
    """n distinct one-row examples whose first id says the source (tag) and second the example."""
    return [Encoded(np.array([tag, i, 1], np.int32), 1, 0) for i in range(n)]


def slots(order: MixtureOrder, step: int) -> list[tuple[int, int]]:
    return [(source, int(example.ids[1])) for source, example in order.step_examples(step)]


def test_sources_are_drawn_by_weight_within_binomial_tolerance():
    order = MixtureOrder([examples(0, 50), examples(1, 30), examples(2, 20)], [3.0, 1.0, 0.0], batch_size=8,
                         grad_accum=1, seed=0)
    drawn = np.concatenate([order.draws(step) for step in range(500)])
    assert abs(np.mean(drawn == 0) - 0.75) < 0.025  # 4000 draws: 4 standard deviations are 0.027
    assert abs(np.mean(drawn == 1) - 0.25) < 0.025
    assert not np.any(drawn == 2)  # weight 0: never drawn


def test_each_source_is_read_in_its_own_permutations_without_repeats_within_a_pass():
    order = MixtureOrder([examples(0, 12), examples(1, 7)], [1.0, 1.0], batch_size=4, grad_accum=2, seed=3)
    read = {0: [], 1: []}
    for step in range(30):
        for source, index in slots(order, step):
            read[source].append(index)
    for source, size in ((0, 12), (1, 7)):
        passes = [read[source][i: i + size] for i in range(0, len(read[source]) - size + 1, size)]
        assert passes and all(sorted(p) == list(range(size)) for p in passes)  # every example once per pass
        assert passes[0] != passes[1]  # a new permutation each pass


def test_any_step_is_addressable_so_a_resumed_run_takes_the_same_batches():
    sources = [examples(0, 40), examples(1, 25)]
    walked = MixtureOrder(sources, [2.0, 1.0], batch_size=4, grad_accum=1, seed=5)
    sequence = [slots(walked, step) for step in range(60)]
    fresh = MixtureOrder(sources, [2.0, 1.0], batch_size=4, grad_accum=1, seed=5)
    assert slots(fresh, 59) == sequence[59] and slots(fresh, 17) == sequence[17]
    other_seed = MixtureOrder(sources, [2.0, 1.0], batch_size=4, grad_accum=1, seed=6)
    assert [slots(other_seed, s) for s in range(5)] != sequence[:5]
    batches = walked.step_batches(7)
    assert [row[:2].tolist() for row in batches[0].input_ids] == [list(slot) for slot in sequence[7]]


@pytest.fixture(scope="module")
def mixture_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    from twintune.data.synthetic import synthetic_financial_sentiment

    sentences = [e for e in synthetic_financial_sentiment(n=90, seed=4)]
    (root / "news.txt").write_text("".join(e.text + "\n" for e in sentences[:60]))
    (root / "qa.jsonl").write_text("".join(json.dumps({"question": e.text, "answer": " " + e.label}) + "\n"
                                           for e in sentences))
    return root


def _recipe(root, *overrides):
    mixture = (f"data.mixture=[{{source: {root}/news.txt, task: causal_lm, weight: 1}}, "
               f"{{source: {root}/qa.jsonl, template: 'Q: {{question}}\\nA:', weight: 3}}]")
    return load_recipe(DEMO, ["task={name: instruction, completion: answer}", mixture, "data.max_length=64",
                              "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0", *overrides])


def test_a_mixture_trains_the_same_on_both_backends_and_reports_each_source(mixture_files):
    runs = {b: prepare(_recipe(mixture_files, "train.max_steps=8"), b) for b in ("mlx", "torch")}
    losses = {b: np.array([train_step(run, s)["loss"] for s in range(8)]) for b, run in runs.items()}
    assert np.abs(losses["mlx"] - losses["torch"]).max() < 1e-4 * losses["torch"].max()
    report = evaluate(runs["torch"])
    assert set(report.sources) == {"news", "qa"}
    parts = runs["torch"].sources
    assert report.tokens == sum(report.sources[name].tokens for name in parts)
    assert len(runs["torch"].splits["validation"]) == sum(len(p["validation"]) for p in parts.values())
    # the instruction source's rows end in the label word's tokens and end-of-text; the news rows are packed
    assert all(e.prompt_len > 1 for e in parts["qa"]["train"]) and all(e.prompt_len == 1 for e in parts["news"]["train"])


def test_a_mixture_runs_summary_has_each_sources_figures_and_resume_is_exact(mixture_files, tmp_path):
    whole = train(_recipe(mixture_files, "train.max_steps=6"), "torch", tmp_path / "whole", progress=False)
    assert {"val_loss/news", "val_perplexity/qa"} <= set(whole)
    recipe = _recipe(mixture_files, "train.max_steps=6", "train.save_every=3")
    saved = train(recipe, "torch", tmp_path / "saved", progress=False)
    assert saved["train_losses"] == whole["train_losses"]
    resumed = train(recipe, "torch", resume=tmp_path / "saved" / "checkpoints" / "step-00000003", progress=False)
    assert resumed["train_losses"] == whole["train_losses"]  # steps 4-6 again, from step 3's checkpoint


@pytest.mark.parametrize("overrides, match", [
    (["data.mixture=[{source: a.jsonl, weight: 0}, {source: b.jsonl, weight: 0}]"],
     "data.mixture has no positive weight"),
    (["data.mixture=[{source: a.jsonl, task: classification}]"], "'data.mixture[0].task' must be causal_lm or instruction"),
    (["data.mixture=[{source: a.txt, task: causal_lm, template: '{x}'}]"], "'data.mixture[0].template' belongs to instruction"),
    (["data.mixture=[{source: a.jsonl}, {source: data/a.jsonl}]"], "data.mixture names 'a' twice"),
    (["data.mixture=[{weight: 2}]"], "'data.mixture[0].source' is missing"),
    (["data.mixture=[{source: a.jsonl, wieght: 2}]"], "'data.mixture[0].wieght' is unknown; did you mean 'data.mixture[0].weight'"),
])
def test_bad_mixtures_are_one_sentence(overrides, match):
    with pytest.raises(TwintuneError, match=match.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_recipe(DEMO, ["task=instruction", *overrides])


def test_a_classification_recipe_refuses_a_mixture():
    with pytest.raises(TwintuneError, match="data.mixture mixes generative tasks"):
        load_recipe(DEMO, ["data.mixture=[{source: a.jsonl}]"])
