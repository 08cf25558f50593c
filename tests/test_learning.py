"""The demo recipe learns on both backends: validation accuracy rises from chance to >= 0.9.

The built-in tiny GPT-Neo is pre-trained on unlabelled synthetic sentences only, so before
fine-tuning it scores the label words at chance.
"""

import pytest

from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_demo_recipe_learns_financial_sentiment(backend):
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml")
    run = prepare(recipe, backend)
    before = evaluate(run).accuracy
    for step in range(run.total_steps):
        train_step(run, step)
    after = evaluate(run)
    assert before < 0.45, before  # three balanced classes: chance is 1/3
    assert after.accuracy >= 0.9, after.accuracy
    assert min(c["f1"] for c in after.per_class.values()) > 0.85, after.per_class
