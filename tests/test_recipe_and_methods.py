"""Recipes are validated by name; LoRA targets and initial values are drawn once in numpy."""

import math
from pathlib import Path

import numpy as np
import pytest

from twintune.errors import TwintuneError
from twintune.methods import LoRA
from twintune.recipe import load_recipe
from twintune.tasks import ClassificationReport
from twintune.train.schedule import learning_rate

LAYERS = {f"transformer.h.{i}.attn.attention.{p}": (64, 64) for i in range(2) for p in ("q_proj", "v_proj", "k_proj")}
LAYERS.update({f"transformer.h.{i}.mlp.c_fc": (256, 64) for i in range(2)})


def test_recipes_in_the_repository_are_valid():
    paths = sorted(Path("recipes").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.method.name == ("full" if path.name.endswith("full-8bit.yaml") else "lora"), path
    full = load_recipe("recipes/gpt-neo-1.3b-financial-sentiment-full-8bit.yaml")
    assert full.train.optimizer.name == "adamw8bit" and full.train.gradient_checkpointing and full.dtype == "bfloat16"
    flagship = load_recipe("recipes/gpt-neo-1.3b-financial-sentiment-lora.yaml")
    assert flagship.model == "EleutherAI/gpt-neo-1.3B" and flagship.data.subset == "sentences_allagree"
    qlora = load_recipe("recipes/gpt-neo-1.3b-financial-sentiment-qlora.yaml")
    assert qlora.quantize.type == "nf4" and qlora.quantize.double_quant and qlora.model == flagship.model


def test_overrides_are_typed_and_checked():
    recipe = load_recipe(None, ["train.lr=1e-3", "method.target_modules=.*q_proj", "train.betas=[0.9,0.95]"])
    assert recipe.train.lr == 0.001 and recipe.method.target_modules == ".*q_proj"
    for bad, fragment in [("train.batch_size=2.5", "whole number"), ("method.rslora=maybe", "true or false"),
                          ("train.schedule=step", "constant, linear or cosine"), ("data.validation_fraction=1.5", "between 0 and 1"),
                          ("nonsense", "key=value"), ("method.dropout=1", "[0, 1)")]:
        with pytest.raises(TwintuneError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
            load_recipe(None, [bad])


def test_lora_targets_by_name_and_regex():
    assert len(LoRA(target_modules=("q_proj", "v_proj")).targets(LAYERS)) == 4
    assert LoRA(target_modules=r"transformer\.h\.1\..*_proj").targets(LAYERS) == [
        "transformer.h.1.attn.attention.q_proj", "transformer.h.1.attn.attention.v_proj", "transformer.h.1.attn.attention.k_proj"]
    with pytest.raises(TwintuneError, match="matched no linear layer"):
        LoRA(target_modules="q_proj").targets(LAYERS)  # a regex must match the full name
    with pytest.raises(TwintuneError, match="rank r=65"):
        LoRA(r=65).targets(LAYERS)


def test_lora_init_is_kaiming_uniform_and_zero_and_seeded():
    lora = LoRA(r=4, alpha=8, target_modules=("c_fc",))
    init = lora.init_values(LAYERS, seed=3)
    a = init["transformer.h.0.mlp.c_fc.lora_A.weight"]
    assert a.shape == (4, 64) and np.abs(a).max() <= 1 / math.sqrt(64)
    assert a.std() > 0.5 / math.sqrt(3 * 64)  # uniform(-b, b) has std b/sqrt(3)
    assert not init["transformer.h.0.mlp.c_fc.lora_B.weight"].any()
    assert np.array_equal(a, lora.init_values(LAYERS, seed=3)["transformer.h.0.mlp.c_fc.lora_A.weight"])
    assert lora.scale == 2.0 and LoRA(r=4, alpha=8, rslora=True).scale == 4.0


def test_schedule_matches_hugging_face_formulas():
    assert learning_rate(0, 1.0, 100, 10, "linear") == 0.0
    assert learning_rate(5, 1.0, 100, 10, "linear") == 0.5
    assert learning_rate(10, 1.0, 100, 10, "linear") == 1.0
    assert learning_rate(55, 1.0, 100, 10, "linear") == pytest.approx(0.5)
    assert learning_rate(55, 1.0, 100, 10, "cosine") == pytest.approx(0.5)
    assert learning_rate(99, 1.0, 100, 0, "constant") == 1.0


def test_classification_report():
    report = ClassificationReport.of(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), ["n", "u", "p"])
    assert report.accuracy == 0.6
    assert report.confusion == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * 0.5 * 1 / 1.5, 2 * 1 * 0.5 / 1.5]
    assert report.macro_f1 == pytest.approx(sum(f1) / 3)
