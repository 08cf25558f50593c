"""Finished runs: eval and predict on either backend, and merge into a checkpoint transformers loads."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from twintune.cli import main
from twintune.errors import TwintuneError
from twintune.train.runs import merge_run
from twintune.recipe import load_recipe
from twintune.train.loop import train
from twintune.train.runs import evaluate_target, open_run, predict_texts

SETTINGS = ["data.synthetic_size=300", "train.max_steps=40", "train.batch_size=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    summary = train(load_recipe("recipes/demo-financial-sentiment.yaml", SETTINGS), "torch", out, progress=False)
    return out, summary


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_eval_gives_the_training_runs_numbers_on_either_backend(run_dir, backend):
    out, summary = run_dir
    report = evaluate_target(out, "validation", backend)  # the adapter travels: trained on torch
    assert report["accuracy"] == summary["val_accuracy"] and report["confusion"] == summary["val_confusion"]
    assert set(report["per_class"]["positive"]) >= {"precision", "recall", "f1", "support"}
    test = evaluate_target(out, "test", backend)
    assert test["examples"] == sum(test["per_class"][k]["support"] for k in test["labels"])


def test_eval_and_predict_from_the_command_line(run_dir):
    out, _ = run_dir
    shown = subprocess.run([sys.executable, "-m", "twintune", "eval", str(out), "--split", "test", "--json"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["split"] == "test"
    table = subprocess.run([sys.executable, "-m", "twintune", "eval", str(out)], capture_output=True, text=True)
    assert "confusion (rows: true, columns: predicted)" in table.stdout
    texts = ["Operating profit rose to EUR 13.1 mn in the first quarter .", "Net sales fell by 12 % ."]
    predicted = subprocess.run([sys.executable, "-m", "twintune", "predict", str(out), *texts],
                               capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.strip().splitlines()) == 2


def test_predict_gives_probabilities_that_sum_to_one(run_dir):
    out, _ = run_dir
    rows = predict_texts(out, ["Net sales rose by 40 % .", "The annual general meeting will be held in Espoo ."])
    for row in rows:
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    with pytest.raises(TwintuneError, match="at least one non-empty text"):
        predict_texts(out, ["  "])


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_merged_checkpoint_gives_the_adapter_models_logits_in_transformers(tmp_path, quantize):
    from transformers import GPTNeoForCausalLM

    out = tmp_path / "run"
    train(load_recipe("recipes/demo-financial-sentiment.yaml", [*SETTINGS[:2], "train.max_steps=10",
                                                                 f"quantize.type={quantize}"]),
          "torch", out, progress=False)
    merged = merge_run(out, tmp_path / "merged")
    model = GPTNeoForCausalLM.from_pretrained(merged).eval()
    for backend in ("torch", "mlx"):
        run = open_run(out, backend)
        ids = run.splits["validation"][0].ids[None, :]
        expected = run.backend.logits(ids)
        with torch.no_grad():
            got = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), backend
    with pytest.raises(TwintuneError, match="is not empty"):
        merge_run(out, tmp_path / "merged")


def test_missing_targets_are_named(tmp_path):
    with pytest.raises(TwintuneError, match="does not exist"):
        evaluate_target(tmp_path / "nope")
    with pytest.raises(TwintuneError, match="not a run directory"):
        evaluate_target(tmp_path)
    with pytest.raises(TwintuneError, match="split must be"):
        evaluate_target(tmp_path, "dev")


def test_export_copies_the_peft_adapter_and_explains_mlx_lm(run_dir, tmp_path, capsys):
    run_dir, _ = run_dir
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    # the adapter's files, and the built-in base carried along (tests/test_export_standalone.py)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == sorted(
        [p.name for p in (run_dir / "adapter").iterdir()] + ["base-model"])
    assert main(["export", str(run_dir), "--format", "mlx-lm", "--out", str(tmp_path / "mlx")]) == 2
    err = capsys.readouterr().err
    assert "mlx-lm has no 'gpt_neo' model family" in err and "Traceback" not in err
    assert not (tmp_path / "mlx").exists()
