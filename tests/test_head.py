"""The linear classification head (task: {name: classification, head: linear}): the same on both
backends, learning the demo alone and with a method, saved with the adapter, in and out of PEFT's
SEQ_CLS adapters, and merged into a checkpoint transformers' GPTNeoForSequenceClassification loads."""

import json

import numpy as np
import pytest
import torch
import yaml

from twintune.api import load
from twintune.errors import TwintuneError
from twintune.formats.adapter import load_adapter, save_adapter
from twintune.formats.checkpoint import load_checkpoint, load_tokenizer
from twintune.formats.safetensors_io import read_safetensors
from twintune.models import GPTNeoSpec
from twintune.recipe import recipe_from_dict
from twintune.tasks import HEAD, head_surgery
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate, predict
from twintune.train.loop import train
from twintune.train.runs import evaluate_target, merge_run, open_run, predict_texts

BACKENDS = ["mlx", "torch"]
DEMO = yaml.safe_load(open("recipes/demo-financial-sentiment.yaml"))
LABELS = ["negative", "neutral", "positive"]


def _recipe(method=None, data=None, train_keys=None, **top):
    return recipe_from_dict({**DEMO, "task": {"name": "classification", "head": "linear"},
                             "method": method or DEMO["method"], "data": {**DEMO["data"], **(data or {})},
                             "train": {**DEMO["train"], **(train_keys or {})}, **top})


def _small(method=None, **top):
    return _recipe(method, data={"synthetic_size": 120}, train_keys={"max_steps": 20, "lr": 1e-2}, **top)


def _losses(run, steps):
    return np.array([train_step(run, step)["loss"] for step in range(steps)])


# ---- both backends, one model --------------------------------------------------------------------

def test_the_head_is_a_labels_by_width_layer_that_adds_its_count_to_the_method():
    run = prepare(_small({"name": "none"}), "torch")
    state = run.backend.trainable_state()
    assert list(state) == [HEAD] and state[HEAD].shape == (3, run.spec.hidden_size)
    assert run.plan.trainable_parameters() == 3 * run.spec.hidden_size
    lora = prepare(_small(), "torch")
    assert lora.plan.trainable_parameters() == prepare(
        recipe_from_dict({**DEMO, "data": {**DEMO["data"], "synthetic_size": 120}}), "torch"
    ).plan.trainable_parameters() + 3 * run.spec.hidden_size
    # N(0, 0.02) from (seed, the head's own stream), as transformers initialises `score`
    np.testing.assert_array_equal(state[HEAD], head_surgery(3, run.spec.hidden_size, seed=0).values[HEAD])
    assert abs(state[HEAD].std() - 0.02) < 0.005


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-3), ("float64", 1e-9)])
def test_twenty_steps_of_lora_with_a_head_give_the_same_losses_and_scores_on_both_backends(dtype, tolerance):
    runs = {b: prepare(_small(dtype=dtype), b) for b in BACKENDS}
    losses = {b: _losses(run, 20) for b, run in runs.items()}
    assert losses["torch"][-1] < 0.8 * losses["torch"][0]  # it learns
    assert np.abs(losses["mlx"] - losses["torch"]).max() / losses["torch"].max() < tolerance
    scores = {b: predict(run, run.splits["validation"])[1] for b, run in runs.items()}
    assert np.abs(scores["mlx"] - scores["torch"]).max() / np.abs(scores["torch"]).max() < tolerance
    heads = {b: run.backend.trainable_state()[HEAD] for b, run in runs.items()}
    assert np.abs(heads["mlx"] - heads["torch"]).max() / np.abs(heads["torch"]).max() < tolerance


def test_head_alone_gives_the_same_losses_on_both_backends():
    losses = {b: _losses(prepare(_small({"name": "none"}), b), 20) for b in BACKENDS}
    assert np.abs(losses["mlx"] - losses["torch"]).max() / losses["torch"].max() < 1e-5


# ---- learning the demo ---------------------------------------------------------------------------

@pytest.mark.parametrize("method, lr, bar", [({"name": "none"}, 3e-3, 0.45), (None, 3e-3, 0.70)])
def test_the_head_learns_the_demo(method, lr, bar):
    """Head alone ("fine-tuning I", a linear probe of the tiny model's last prompt token): 0.56 on
    validation; LoRA with the head ("fine-tuning II"): 0.93. Chance is 0.33 (balanced classes)."""
    run = prepare(_recipe(method, train_keys={"lr": lr}), "torch")
    for step in range(run.total_steps):
        train_step(run, step)
    assert evaluate(run).accuracy >= bar


# ---- saved, reopened, merged ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("head") / "run"
    summary = train(_recipe(data={"synthetic_size": 120}, train_keys={"max_steps": 6, "lr": 1e-2}), "torch", out,
                    progress=False)
    return out, summary


def test_a_head_run_saves_a_peft_seq_cls_adapter_with_its_labels(head_run):
    out, summary = head_run
    assert summary["task"] == {"name": "classification", "head": "linear"}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert json.loads((out / "adapter" / "head_config.json").read_text())["labels"] == LABELS
    tensors = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.score.weight"].shape == (3, 64)


def test_a_head_run_evaluates_and_predicts_the_same_on_both_backends(head_run):
    out, summary = head_run
    reports = {b: evaluate_target(out, "validation", b) for b in BACKENDS}
    assert reports["mlx"]["accuracy"] == reports["torch"]["accuracy"] == summary["val_accuracy"]
    rows = {b: predict_texts(out, ["Operating profit rose to EUR 13.1 mn ."], b)[0] for b in BACKENDS}
    assert rows["mlx"]["label"] == rows["torch"]["label"]
    for label in LABELS:
        assert abs(rows["mlx"]["probabilities"][label] - rows["torch"]["probabilities"][label]) < 1e-5
    model = load(None, out, backend="torch")
    assert model.predict(["Operating profit rose to EUR 13.1 mn ."])[0]["label"] == rows["torch"]["label"]


def test_a_merged_head_run_is_a_sequence_classification_checkpoint_with_the_same_logits(head_run, tmp_path):
    from transformers import GPTNeoForSequenceClassification

    out, _ = head_run
    merged = merge_run(out, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    hf = GPTNeoForSequenceClassification.from_pretrained(str(merged), dtype=torch.float32).eval()

    run = open_run(out, "torch")
    encoded = run.splits["validation"][:6]
    _, ours = predict(run, encoded)
    width = max(len(e.ids) for e in encoded)  # right-padded with the end-of-text token, as a batch would be
    ids = np.full((len(encoded), width), config["pad_token_id"], np.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e.ids)] = e.ids
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.from_numpy(ids)).logits, dim=-1).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_a_head_refuses_other_labels_and_a_recipe_without_a_head(head_run, tmp_path):
    out, _ = head_run
    recipe = json.loads((out / "recipe.json").read_text())
    for name, change, words in [
        ("reordered", {"prompt": {**recipe["prompt"], "labels": {"positive": " positive", "neutral": " neutral",
                                                                   "negative": " negative"}}}, "was trained on labels"),
        ("fewer", {"prompt": {**recipe["prompt"], "labels": {"down": " down", "up": " up"}}}, "was trained on labels"),
        ("verbalizer", {"task": {"name": "classification", "head": "verbalizer"}}, "has a classification head"),
    ]:
        other = tmp_path / name
        other.mkdir()
        (other / "recipe.json").write_text(json.dumps({**recipe, **change}))
        (other / "adapter").symlink_to(out / "adapter")
        with pytest.raises(TwintuneError, match=words):
            predict_texts(other, ["Sales fell ."], "torch")
    with pytest.raises(TwintuneError, match="was trained on labels"):
        load(None, out, backend="torch", labels=["up", "flat", "down"])
    with pytest.raises(TwintuneError, match="reads no label words"):
        evaluate_target(out, "validation", "torch", shots=1)


# ---- PEFT's SEQ_CLS adapters ---------------------------------------------------------------------

def _seq_cls_model(model_dir, pad_token_id):
    from transformers import GPTNeoForSequenceClassification

    return GPTNeoForSequenceClassification.from_pretrained(str(model_dir), num_labels=3, pad_token_id=pad_token_id,
                                                           dtype=torch.float32).eval()


def _rows(model_dir, count=4):
    tokenizer = load_tokenizer(model_dir)
    texts = ["Operating profit rose to EUR 13.1 mn .", "Sales fell sharply .", "The company is based in Espoo .",
             "Net loss widened to EUR 2 mn ."][:count]
    return texts, [tokenizer.encode(f"Sentence: {t}\nSentiment:", add_special_tokens=False).ids for t in texts]


def _peft_scores(model, ids_list, pad_token_id):
    width = max(map(len, ids_list))
    ids = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in ids_list])
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits, dim=-1).numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_twintune_head_adapter_gives_the_same_scores_in_peft(backend, tmp_path):
    from peft import PeftModel

    run = prepare(_small(), backend)
    _losses(run, 3)
    state = run.backend.trainable_state()
    adapter = save_adapter(tmp_path / "adapter", run.method, state, run.recipe.model, labels=LABELS)
    eos = json.loads((run.model_dir / "config.json").read_text())["eos_token_id"]
    peft_model = PeftModel.from_pretrained(_seq_cls_model(run.model_dir, eos), str(adapter)).eval()
    np.testing.assert_array_equal(peft_model.base_model.model.score.modules_to_save["default"].weight.detach().numpy(),
                                  state[HEAD])
    texts, ids = _rows(run.model_dir)
    reference = _peft_scores(peft_model, ids, eos)
    encoded = [run.encoder.encode(text, "neutral") for text in texts]
    _, ours = predict(run, encoded)
    np.testing.assert_allclose(ours, reference, atol=2e-5)


@pytest.fixture(scope="module")
def peft_seq_cls_adapter(tmp_path_factory):
    """A PEFT LoRA SEQ_CLS adapter with random A, B and score, saved; its log-softmax scores on four texts."""
    from peft import LoraConfig, get_peft_model

    from twintune.formats.tiny_model import builtin_model_dir

    model_dir = builtin_model_dir("tiny-gpt-neo")
    torch.manual_seed(0)
    eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    model = get_peft_model(_seq_cls_model(model_dir, eos), config).eval()
    out = tmp_path_factory.mktemp("peft-seq-cls") / "adapter"
    model.save_pretrained(str(out))
    texts, ids = _rows(model_dir)
    return out, texts, _peft_scores(model, ids, eos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_peft_seq_cls_adapter_loads_with_its_head_and_gives_peft_scores(backend, peft_seq_cls_adapter):
    adapter, texts, reference = peft_seq_cls_adapter
    spec = GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)
    method, state = load_adapter(adapter, spec)
    assert method.name == "lora" and state[HEAD].shape == (3, spec.hidden_size)
    model = load("builtin:tiny-gpt-neo", adapter=adapter, backend=backend, labels=LABELS)
    rows = model.predict(texts)
    ours = np.log([[row["probabilities"][label] for label in LABELS] for row in rows])
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    with pytest.raises(TwintuneError, match="scores 3 labels, but 2"):
        load("builtin:tiny-gpt-neo", adapter=adapter, backend=backend, labels=["down", "up"])


# ---- every method with a head --------------------------------------------------------------------

EVERY_METHOD = [
    {"name": "dora", "r": 4}, {"name": "ia3"}, {"name": "bitfit"}, {"name": "last_blocks", "n": 1}, {"name": "full"},
    {"name": "adapter", "style": "pfeiffer"}, {"name": "prompt", "n": 4, "init": "sample_vocab"},
    {"name": "ptuning", "n": 4, "encoder": "mlp", "encoder_hidden_size": 16},
    {"name": "prefix", "n": 4, "projection": True, "encoder_hidden_size": 16}, {"name": "loreft", "r": 2},
]


@pytest.mark.parametrize("method", EVERY_METHOD, ids=lambda m: m["name"])
def test_every_method_trains_with_a_head_alike_on_both_backends_and_reopens_on_the_other(method, tmp_path):
    recipe = _recipe(method, data={"synthetic_size": 90}, train_keys={"max_steps": 3, "lr": 1e-2, "warmup_steps": 0})
    summaries = {b: train(recipe, b, tmp_path / b, progress=False) for b in BACKENDS}
    losses = {b: np.array(s["train_losses"]) for b, s in summaries.items()}
    assert np.abs(losses["mlx"] - losses["torch"]).max() / losses["torch"].max() < 1e-4
    assert summaries["torch"]["trainable_params"] == prepare(
        recipe_from_dict({**DEMO, "method": method}), "torch").plan.trainable_parameters() + 3 * 64
    # each backend's saved run (adapter + head) gives the other the same validation predictions
    for saved, other in (("torch", "mlx"), ("mlx", "torch")):
        report = evaluate_target(tmp_path / saved, "validation", other)
        assert report["accuracy"] == summaries[saved]["val_accuracy"]
        assert report["confusion"] == summaries[saved]["val_confusion"]


def test_the_memory_estimate_counts_the_head():
    from twintune.memory import estimate_recipe

    _, with_head = estimate_recipe("recipes/demo-financial-sentiment.yaml", ["task.head=linear"])
    _, without = estimate_recipe("recipes/demo-financial-sentiment.yaml")
    assert "(37,056 trainable)" in with_head and "(36,864 trainable)" in without  # + 3 labels x 64
