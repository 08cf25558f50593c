"""The docstring examples of the parts in CHECKED run and give what they say (doctest): in a scratch
directory with the repository's recipes beside it, with the built-in tiny GPT-Neo at hand as `base`
(and its `spec` and `weights`). A part joins CHECKED once every example in it runs; the examples of
train/, api, formats, memory and recipe still name run directories they do not make (issue 27)."""

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
CHECKED = ("twintune.methods", "twintune.tasks", "twintune.data", "twintune.quant", "twintune.dropout",
           "twintune.backends.base", "twintune.models", "twintune.keys", "twintune.generation", "twintune.errors",
           "twintune.train.schedule", "twintune.train.metrics", "twintune.train.loss_scale", "twintune.train.build",
           "twintune.train.step", "twintune.recipe", "twintune.formats.checkpoint", "twintune.formats.tiny_model",
           "twintune.formats.safetensors_io")
EXACT = ("twintune.backends",)  # the selector, not the framework code under it


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(twintune.__path__, "twintune.")]
    return [n for n in ["twintune", *names] if n.startswith(CHECKED) or n in EXACT]


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


@pytest.mark.parametrize("test", _examples())
def test_the_example_runs_and_gives_what_it_says(test, tiny_base, tmp_path, monkeypatch):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    test.globs.update(tiny_base)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)


def test_the_checked_parts_have_examples():
    assert sum(1 for _ in _examples()) >= 30
    assert os.path.isdir(ROOT / "recipes")
