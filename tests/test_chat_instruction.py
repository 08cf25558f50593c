"""Chat data for the instruction task (TRL's `messages` rows): rendered with the tokenizer's chat
template or the recipe's data.chat_template, the token ids transformers' apply_chat_template; the loss
on the assistant turns and their end-of-sequence token only; both backends alike; a model trained on
a short chat set stops at end-of-sequence in `twintune generate --chat`; no template is one sentence."""

import json
import shutil

import numpy as np
import pytest

from twintune.api import generate
from twintune.cli import main
from twintune.data.batching import make_batch
from twintune.errors import TwintuneError
from twintune.recipe import recipe_from_dict
from twintune.train.build import prepare
from twintune.train.loop import train
from twintune.train.step import train_step

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token if m['role'] == 'assistant' }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
ROWS = [{"messages": [{"role": "system", "content": "You rate news."},
                      {"role": "user", "content": f"Sales {verb} {n} % ."},
                      {"role": "assistant", "content": answer},
                      {"role": "user", "content": "Sure?"},
                      {"role": "assistant", "content": "Yes."}]}
        for n in range(20) for verb, answer in (("rose", "positive"), ("fell", "negative"))]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """The rows as JSONL, and the built-in GPT-Neo with TEMPLATE in its own tokenizer_config.json."""
    from twintune.formats.checkpoint import resolve_model_dir

    root = tmp_path_factory.mktemp("chat")
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    shutil.copytree(resolve_model_dir("builtin:tiny-gpt-neo"), root / "model")
    config = json.loads((root / "model" / "tokenizer_config.json").read_text())
    (root / "model" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return root


def _recipe(root, where="recipe", dtype="float32", **train):
    data = {"source": str(root / "rows.jsonl"), "max_length": 64, "validation_fraction": 0.1, "test_fraction": 0.1}
    model = "builtin:tiny-gpt-neo"
    if where == "recipe":
        data["chat_template"] = TEMPLATE
    elif where == "tokenizer":
        model = str(root / "model")
    return recipe_from_dict({"name": "chat", "model": model, "dtype": dtype, "data": data, "task": {"name": "instruction"},
                             "method": {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj", "c_fc", "c_proj"]},
                             "train": {"batch_size": 8, "lr": 3e-3, "max_steps": 150, **train}})


def _transformers_ids(messages):
    from transformers import PreTrainedTokenizerFast

    from twintune.formats.checkpoint import resolve_model_dir

    theirs = PreTrainedTokenizerFast(tokenizer_file=str(resolve_model_dir("builtin:tiny-gpt-neo") / "tokenizer.json"),
                                     chat_template=TEMPLATE, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    found = theirs.apply_chat_template(messages, tokenize=True)
    return list(found["input_ids"] if hasattr(found, "keys") else found), theirs


@pytest.mark.parametrize("where", ["recipe", "tokenizer"])
def test_the_ids_are_apply_chat_templates_and_the_targets_the_assistant_turns(chat_data, where):
    run = prepare(_recipe(chat_data, where), "torch")
    for example in run.splits["train"][:5]:
        ids = example.ids.tolist()
        row = next(r for r in ROWS if _transformers_ids(r["messages"])[0] == ids)  # the template's ids, whole
        tokenizer = _transformers_ids(row["messages"])[1]
        targets = make_batch([example]).targets.tolist()
        # each assistant turn's text after "assistant:", through its end-of-sequence token; nothing else
        assert tokenizer.decode(targets) == "".join(f" {m['content']}<|endoftext|>" for m in row["messages"]
                                                    if m["role"] == "assistant")


def test_packed_rows_keep_each_conversations_targets(chat_data):
    recipe = _recipe(chat_data).to_dict()
    recipe["data"]["max_length"] = 128  # three conversations a row
    plain, packed = (prepare(recipe_from_dict({**recipe, "task": {"name": "instruction", "packing": packing}}), "torch")
                     for packing in (False, True))
    assert len(packed.splits["train"]) < len(plain.splits["train"])
    assert make_batch(packed.splits["train"]).targets.tolist() == make_batch(plain.splits["train"]).targets.tolist()


def test_chat_rows_train_alike_on_both_backends(chat_data):
    losses = {}
    for backend in ("mlx", "torch"):
        run = prepare(_recipe(chat_data, dtype="float64"), backend)
        losses[backend] = np.array([train_step(run, step)["loss"] for step in range(4)])
    assert np.abs(losses["mlx"] - losses["torch"]).max() < 1e-9 and losses["torch"][3] < losses["torch"][0]


def test_a_model_trained_on_a_short_chat_set_stops_at_end_of_sequence(chat_data, tmp_path, capsys):
    train(_recipe(chat_data), "torch", tmp_path / "run", progress=False)
    for backend in ("torch", "mlx"):
        out = generate(tmp_path / "run", "Sales rose 7 % .", backend=backend, chat=True, system="You rate news.")
        assert (out.text, out.finish_reason) == (" positive", "eos"), backend
    assert main(["generate", str(tmp_path / "run"), "Sales fell 3 % .", "--chat", "--system", "You rate news."]) == 0
    assert capsys.readouterr().out == " negative\n"


def test_a_model_without_a_chat_template_is_one_sentence(chat_data, tmp_path):
    recipe = _recipe(chat_data, where="none")
    with pytest.raises(TwintuneError, match=r"rows.jsonl line 1 holds chat messages, and this model's tokenizer has no "
                                            r"chat template \(GPT-Neo's has none\): set data.chat_template"):
        prepare(recipe, "torch")
    with pytest.raises(TwintuneError, match="--chat renders the prompt with a chat template, and this model has none"):
        generate("builtin:tiny-gpt-neo", "Hi", backend="torch", chat=True)
