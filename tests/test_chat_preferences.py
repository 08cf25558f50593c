"""Conversational preference data (TRL's format: lists of {role, content} messages) rendered with the
tokenizer's own chat template: the token ids equal transformers' apply_chat_template, as TRL's
apply_chat_template cuts them (the prompt with the generation prompt, each answer after it), both
backends train on them alike, and a tokenizer without a template is refused by name."""

import json
import shutil

import numpy as np
import pytest
import yaml

from twintune.errors import TwintuneError
from twintune.recipe import recipe_from_dict
from twintune.train.build import prepare
from twintune.train.step import train_step

DEMO = yaml.safe_load(open("recipes/demo-dpo.yaml"))
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PAIRS = [{"prompt": [{"role": "system", "content": "You rate news."},
                     {"role": "user", "content": f"Sales {verb} {n} % . Sentiment?"}],
          "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}
         for n in range(12) for verb, good, bad in (("rose", "positive", "negative"), ("fell", "negative", "positive"))]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The built-in GPT-Neo with a chat template in its tokenizer_config.json."""
    from twintune.formats.tiny_model import builtin_model_dir

    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(builtin_model_dir("tiny-gpt-neo"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    source = folder.parent / "pairs.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return folder, source


def _recipe(model, source, task="preference", dtype="float32"):
    return recipe_from_dict({**DEMO, "model": str(model), "dtype": dtype, "task": {"name": task},
                             "data": {"source": str(source), "validation_fraction": 0.1, "test_fraction": 0.1,
                                      "max_length": 64}})


def test_the_rendered_ids_are_transformers_apply_chat_template(chat_model):
    from transformers import PreTrainedTokenizerFast

    model, source = chat_model
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(model / "tokenizer.json"), chat_template=TEMPLATE,
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    run = prepare(_recipe(model, source), "torch")
    pair = run.splits["train"][0]
    prompt = pair.ids[:pair.prompt_len].tolist()
    def ids(messages, **keys):  # transformers 5 returns a BatchEncoding, 4 a list
        found = theirs.apply_chat_template(messages, **keys)
        return list(found["input_ids"] if hasattr(found, "keys") else found)

    row = next(p for p in PAIRS if ids(p["prompt"], add_generation_prompt=True) == prompt)
    for encoded, key in ((pair, "chosen"), (pair.rejected, "rejected")):
        whole = ids(row["prompt"] + row[key])
        assert encoded.ids.tolist() == whole + [theirs.eos_token_id]  # the answer's turn, then end-of-text
    assert theirs.decode(pair.ids[pair.prompt_len:-1]) == " " + row["chosen"][0]["content"] + "\n"  # after "assistant:"


def test_conversational_pairs_train_alike_on_both_backends(chat_model):
    model, source = chat_model
    losses = {}
    for backend in ("mlx", "torch"):
        run = prepare(_recipe(model, source, dtype="float64"), backend)
        losses[backend] = np.array([train_step(run, step)["loss"] for step in range(3)])
    assert np.abs(losses["mlx"] - losses["torch"]).max() < 1e-9 and losses["torch"][2] < losses["torch"][0]


def test_kto_and_ppo_read_conversational_rows_too(chat_model, tmp_path):
    model, _ = chat_model
    unpaired = tmp_path / "unpaired.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}) + "\n"
                                for p in PAIRS for key in ("chosen", "rejected")))
    run = prepare(_recipe(model, unpaired, task="kto"), "torch")
    assert run.encoder.tokenizer.decode(run.splits["train"][0].ids.tolist()).startswith("system: You rate news.")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in PAIRS))
    recipe = recipe_from_dict({**_recipe(model, prompts).to_dict(),
                               "task": {"name": "ppo", "reward": "python:twintune.rewards.upbeat", "max_new_tokens": 2}})
    run = prepare(recipe, "torch")
    assert run.encoder.tokenizer.decode(run.splits["train"][0].ids.tolist()).endswith("Sentiment?\nassistant:")


def test_chat_rows_without_a_template_are_refused_by_name(chat_model):
    _, source = chat_model
    with pytest.raises(TwintuneError, match="column 'prompt' holds chat messages, and this model's tokenizer has no "
                                            "chat template"):
        prepare(_recipe("builtin:tiny-gpt-neo", source), "torch")
