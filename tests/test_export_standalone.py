"""Exports stand alone (issue 28): `twintune export RUN --format peft --out DIR` of a run on the built-in
model carries its base, so `AutoPeftModelForCausalLM.from_pretrained(DIR)` (a head's:
`AutoPeftModelForSequenceClassification`) loads it from another working directory in a Python where
twintune cannot be imported, with twintune's logits (every method PEFT has); merged folders keep the base's generation config
and get a folder's ordinary mode."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twintune import api
from twintune.recipe import load_recipe
from twintune.train.loop import train
from twintune.train.runs import export_run_adapter, merge_run

DEMO = str(Path(__file__).resolve().parent.parent / "recipes" / "demo-financial-sentiment.yaml")
METHODS = {"lora": [], "dora": ["method={name: dora, r: 4}"], "ia3": ["method={name: ia3}"],
           "prompt": ["method={name: prompt, n: 4}"],
           "ptuning": ["method={name: ptuning, n: 4}"],
           "prefix": ["method={name: prefix, n: 4}"],
           "vera": ["method={name: vera, r: 8, target_modules: [q_proj, v_proj]}"], "head": ["task.head=linear"]}
IDS = [[833, 375, 420, 17, 96, 250]]

# Run where twintune cannot be imported: PEFT and transformers only, from the export's directory alone
STANDALONE = """
import json, sys
sys.modules["twintune"] = None
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
logits = {}
for name, directory in json.loads(sys.argv[1]).items():
    cls = AutoPeftModelForSequenceClassification if name == "head" else AutoPeftModelForCausalLM
    model = cls.from_pretrained(directory).eval()
    with torch.no_grad():
        logits[name] = model(torch.tensor(%s)).logits.float().tolist()
print(json.dumps(logits))
""" % IDS


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for name, overrides in METHODS.items():
        recipe = load_recipe(DEMO, ["train.max_steps=3", "data.synthetic_size=60", "train.lr=2e-2", *overrides])
        train(recipe, "torch", root / "runs" / name, progress=False)
        made[name] = (root / "runs" / name, export_run_adapter(root / "runs" / name, "peft", root / "exports" / name))
    return made


def test_every_export_loads_in_peft_alone_with_twintunes_logits(exports, tmp_path):
    directories = {name: str(out) for name, (_, out) in exports.items()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", STANDALONE, json.dumps(directories)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = {name: np.array(values, np.float32) for name, values in json.loads(done.stdout).items()}
    for name, (run_dir, _) in exports.items():
        ours = api.load(None, adapter=run_dir, backend="torch").logits(IDS)
        if name == "head":  # PEFT's SEQ_CLS model pools the last token; ours scores every position
            ours = ours[:, -1]
        elif name in ("prompt", "ptuning"):  # PEFT's logits include the virtual tokens' positions
            theirs[name] = theirs[name][:, -ours.shape[1]:]
        error = np.abs(theirs[name] - ours).max() / np.abs(ours).max()
        assert error < 1e-4, (name, error)


def test_an_export_names_its_base_so_that_it_is_found_from_anywhere(exports, tmp_path):
    _, lora = exports["lora"]
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((lora / "base-model").resolve())
    _, head = exports["head"]
    base = json.loads((head / "base-model" / "config.json").read_text())
    assert base["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"} and base["pad_token_id"] is not None


def test_a_local_base_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    from twintune.formats.tiny_model import builtin_model_dir
    import shutil

    shutil.copytree(builtin_model_dir("tiny-gpt-neo"), tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(DEMO, ["train.max_steps=1", "data.synthetic_size=60", "model=models/tiny"])
    train(recipe, "torch", tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "models" / "tiny").resolve())


def test_a_merged_folder_keeps_the_base_generation_config_and_an_ordinary_mode(exports, tmp_path):
    from twintune.formats.tiny_model import builtin_model_dir
    import shutil

    base = tmp_path / "base"
    shutil.copytree(builtin_model_dir("tiny-gpt-neo"), base)
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0, "max_length": 64}))
    run_dir, _ = exports["lora"]
    recipe = json.loads((run_dir / "recipe.json").read_text())
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    (moved / "recipe.json").write_text(json.dumps({**recipe, "model": str(base)}))
    merged = merge_run(moved, tmp_path / "merged")
    assert json.loads((merged / "generation_config.json").read_text())["max_length"] == 64
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(merged.stat().st_mode) == 0o777 & ~umask
