"""Every docstring example in twintune runs and gives what it says (doctest): in one scratch directory
with the repository's recipes beside it and four short runs made there first (runs/demo: LoRA;
runs/demo-bitfit, runs/demo-ia3; runs/demo-causal-lm), with the built-in tiny GPT-Neo at hand as
`base` (and its `spec` and `weights`)."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
from pathlib import Path

import numpy as np
import pytest

import twintune
from twintune.formats.checkpoint import load_checkpoint, load_tokenizer
from twintune.methods import BaseModel
from twintune.models import GPTNeoSpec, gpt_neo_weights

ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = ("twintune.__main__",)
DEMO = "recipes/demo-financial-sentiment.yaml"
SHORT = ["train.max_steps=4", "data.synthetic_size=120"]
RUNS = {"runs/demo": [], "runs/demo-bitfit": ["method={name: bitfit}"], "runs/demo-ia3": ["method={name: ia3}"],
        "runs/demo-causal-lm": ["task=causal_lm", "data.source=synthetic"]}


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(twintune.__path__, "twintune.")]
    return [n for n in ["twintune", *names] if not n.startswith(LEFT_OUT)]


def _examples():
    for name in _modules():
        for test in doctest.DocTestFinder().find(importlib.import_module(name)):
            if test.examples:
                yield pytest.param(test, id=test.name)


@pytest.fixture(scope="module")
def tiny_base():
    checkpoint = load_checkpoint("builtin:tiny-gpt-neo")
    spec = GPTNeoSpec.from_config(checkpoint.config)
    weights = gpt_neo_weights(spec, checkpoint.weights)
    return {"spec": spec, "weights": weights, "np": np,
            "base": BaseModel(spec, weights, tokenizer=load_tokenizer(checkpoint.directory))}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The directory the examples run in: the recipes, and the runs they name."""
    from twintune.recipe import load_recipe
    from twintune.train.loop import train

    directory = tmp_path_factory.mktemp("examples")
    (directory / "recipes").symlink_to(ROOT / "recipes")
    for out, overrides in RUNS.items():
        train(load_recipe(ROOT / DEMO, SHORT + overrides), "torch", directory / out, progress=False)
    return directory


@pytest.mark.parametrize("test", _examples())
def test_the_example_runs_and_gives_what_it_says(test, tiny_base, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    test.globs.update(tiny_base)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)


def test_the_examples_are_found():
    assert sum(1 for _ in _examples()) >= 90
    assert os.path.isdir(ROOT / "recipes")
