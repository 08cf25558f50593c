"""`twintune doctor`: for each finding a real tiny run that has it, and the healthy demo; each gets its
finding and no other, with its evidence and the --set to try; the sentence a failed run ended with
is kept in metrics.jsonl for it; a directory that is no run is one sentence."""

import csv
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

import twintune
from twintune.cli import main
from twintune.data.synthetic import synthetic_financial_sentiment
from twintune.doctor import doctor
from twintune.recipe import load_recipe
from twintune.train.loop import train
from twintune.errors import TwintuneError

DEMO = "recipes/demo-financial-sentiment.yaml"
# name -> (backend, the recipe's --set values, the one finding expected[, the recipe: the demo's])
RUNS = {
    "healthy": ("torch", [], None),  # the demos as shipped
    "healthy-mlx": ("mlx", ["train.max_steps=20"], None),
    "healthy-dpo": ("torch", [], None, "recipes/demo-dpo.yaml"),
    "healthy-reward-model": ("torch", [], None, "recipes/demo-reward-model.yaml"),
    "healthy-grpo": ("torch", [], None, "recipes/demo-grpo.yaml"),  # judged by its reward: a policy loss hovers at 0
    "healthy-ppo": ("torch", [], None, "recipes/demo-ppo.yaml"),
    "collapsed-grpo": ("torch", ["train.lr=0.1"], "collapsed", "recipes/demo-grpo.yaml"),  # reward hacking
    "lr-low-grpo": ("torch", ["train.lr=1e-7"], "learning_rate_too_low", "recipes/demo-grpo.yaml"),
    # a reward no completion earns: every group's rewards alike, every advantage 0, no gradient
    "dead-grpo": ("torch", ["task.reward=python:format_rewards.answer_tags", "train.max_steps=20"], "did_not_move",
                  "recipes/demo-grpo.yaml"),
    # a model whose logits are 16 times sharper (its final LayerNorm's gain): float16 gradients overflow
    # until the loss scale has come down 16-fold
    "storms": ("torch", ["model={root}/sharp-logits", "dtype=float16", "train.max_steps=60"], "loss_scale_storms"),
    "lr-high": ("torch", ["train.lr=0.05", "train.max_steps=100"], "learning_rate_too_high"),
    "lr-low": ("torch", ["train.lr=1e-7", "train.max_steps=60"], "learning_rate_too_low"),
    "warmup-never-ends": ("torch", ["train.warmup_steps=5000", "train.max_steps=60"], "warmup_never_ended"),
    "still-falling": ("torch", ["train.max_steps=40", "train.schedule=constant", "train.lr=3e-4"], "still_falling"),
    "overfit": ("torch", ["task=causal_lm", "data.source=synthetic", "data.synthetic_size=40", "train.epochs=60",
                          "train.eval_every=10", "train.lr=3e-3"], "overfitting"),
    "nan": ("torch", ["train.lr=100", "train.max_steps=40"], "failed"),
    # one sentence a step at the learning rate the demo tuned for 16: it learns, then loses it
    "diverged": ("torch", ["train.batch_size=1", "train.max_steps=60"], "diverged"),
    "nan-float16": ("torch", ["dtype=float16", "train.lr=100", "train.max_steps=40"], "failed"),
    "one-class": ("torch", ["data.source={root}/imbalanced.csv", "train.max_steps=20"], "one_class"),
}


def _imbalanced_csv(path):
    """Five neutral sentences in six: a classifier trained briefly answers neutral to all."""
    rng = random.Random(0)
    rows = [r for r in synthetic_financial_sentiment(900, seed=3) if r.label == "neutral" or rng.random() < 0.08]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([r.text, r.label] for r in rows)


def _sharp_logits_model(path):
    """The built-in model with its final LayerNorm's gain 16 times larger."""
    shutil.copytree(Path(twintune.__file__).parent / "assets" / "tiny-gpt-neo", path)
    weights = load_file(path / "model.safetensors")
    weights["transformer.ln_f.weight"] = weights["transformer.ln_f.weight"] * 16
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


FORMAT_REWARD = '''def answer_tags(prompts, completions, **columns):
    """1 for an answer in <answer> tags (which the demo's model never writes)."""
    return [1.0 if "<answer>" in completion else 0.0 for completion in completions]
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    _imbalanced_csv(root / "imbalanced.csv")
    _sharp_logits_model(root / "sharp-logits")
    (root / "format_rewards.py").write_text(FORMAT_REWARD)
    sys.path.insert(0, str(root))
    try:
        for name, (backend, settings, _, *recipe) in RUNS.items():
            recipe = load_recipe(recipe[0] if recipe else DEMO, [s.replace("{root}", str(root)) for s in settings])
            try:
                train(recipe, backend, root / name, progress=False)
            except TwintuneError:
                assert name.startswith("nan")
    finally:
        sys.path.remove(str(root))
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_each_run_gets_its_finding_and_no_other(runs, name):
    report = doctor(runs / name)
    expected = RUNS[name][2]
    assert [f["kind"] for f in report["findings"]] == ([expected] if expected else []), report
    assert report["healthy"] == (expected is None)
    for finding in report["findings"]:
        assert finding["sentence"] and finding["evidence"] and finding["try"]
        load_recipe(runs / name / "recipe.json", finding["try"])  # the --set values the run's recipe takes
    if expected is None:
        measure = {"healthy-grpo": "the mean reward", "healthy-ppo": "the mean score (objective/scores)"}
        assert report["summary"].startswith(f"Healthy: {measure.get(name, 'the training loss')} went from "), report


def test_the_findings_name_their_steps_and_numbers(runs):
    overfit = doctor(runs / "overfit")["findings"][0]
    lines = [json.loads(line) for line in open(runs / "overfit" / "metrics.jsonl")]
    evals = [line for line in lines if "val_loss" in line]
    best = min(evals, key=lambda line: line["val_loss"])
    assert overfit["sentence"].startswith(f"Overfitting from the evaluation at step {best['step']}: val_loss rose")
    assert f"val_loss {best['val_loss']:.4g} at step {best['step']}" in overfit["evidence"]
    assert "train.early_stopping_patience=2" in overfit["try"]
    low = doctor(runs / "lr-low")["findings"][0]
    assert low["try"] == ["train.lr=1e-06"]
    warmup = doctor(runs / "warmup-never-ends")["findings"][0]
    assert warmup["sentence"] == "The warm-up never ended: train.warmup_steps is 5000, and the run took 60 steps."
    assert warmup["try"] == ["train.warmup_steps=6"]
    one = doctor(runs / "one-class")["findings"][0]
    assert one["sentence"] == "The classifier predicts one class: 'neutral' for almost every sentence."


def test_a_dead_grpo_run_and_a_float16_storm_say_why(runs):
    dead = doctor(runs / "dead-grpo")["findings"][0]
    assert "every completion of a prompt got the same reward, so every advantage was 0" in dead["sentence"]
    assert dead["evidence"].startswith("the gradient norm was 0 at each of the 20 steps;")
    assert "reward_std, the spread of rewards within a prompt's group, was at most 0" in dead["evidence"]
    assert dead["try"] == ["task.group_size=8"]
    lines = [json.loads(line) for line in open(runs / "storms" / "metrics.jsonl")]
    skipped = [line["step"] for line in lines if line.get("skipped")]
    storms = doctor(runs / "storms")["findings"][0]
    assert storms["sentence"] == (f"float16 gradients overflowed again and again: {len(skipped)} of 60 steps were "
                                  "skipped while the loss scale came down.")
    assert storms["evidence"] == f"skipped steps {', '.join(map(str, skipped))}." and storms["try"] == ["dtype=bfloat16"]


def test_a_failed_run_keeps_its_sentence_in_metrics_jsonl(runs):
    lines = [json.loads(line) for line in open(runs / "nan" / "metrics.jsonl")]
    assert "became inf" in lines[-1]["error"] or "became nan" in lines[-1]["error"]
    finding = doctor(runs / "nan")["findings"][0]
    assert finding["sentence"] == f"The run failed: {lines[-1]['error']}"
    assert finding["try"] == ["train.lr=10"]
    assert doctor(runs / "nan-float16")["findings"][0]["try"] == ["train.lr=10", "dtype=bfloat16"]


def test_the_cli_prints_the_findings_and_json(runs, capsys):
    assert main(["doctor", str(runs / "lr-low")]) == 0
    out = capsys.readouterr().out
    assert "1 finding." in out and "1. The training loss barely moved" in out and "try: --set train.lr=1e-06" in out
    assert main(["doctor", str(runs / "healthy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["healthy"] is True


def test_a_directory_that_is_no_run_is_one_sentence(tmp_path, capsys):
    assert main(["doctor", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"twintune: error: {tmp_path} is not a run directory: it has no metrics.jsonl and recipe.json (give the "
        "directory `twintune train --out` wrote).")
