"""The instruction task (task: instruction): prompt/completion, template and chat rows, the loss on
exactly the completion and end-of-text tokens, and the same losses on both backends."""

import json

import numpy as np
import pytest

from twintune.data.batching import make_batch
from twintune.data.instructions import load_pairs
from twintune.errors import TwintuneError
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate

DEMO = "recipes/demo-financial-sentiment.yaml"
ALPACA = "Instruction: {instruction}\nInput: {input}\nOutput:"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_rows_of_each_shape_become_prompt_and_completion(tmp_path):
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    assert load_pairs(plain, "{prompt}", "completion") == [("Q: 2+2?\nA:", " 4")]
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name the sentiment.", "input": "Sales rose .",
                                                 "output": "positive"}])
    assert load_pairs(alpaca, ALPACA, "output") == [
        ("Instruction: Name the sentiment.\nInput: Sales rose .\nOutput:", " positive")]
    messages = [{"role": "user", "content": "Sales rose?"}, {"role": "assistant", "content": "Yes."}]
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])  # rendered later, with a chat template
    assert load_pairs(chat, "{prompt}", "completion") == [(messages, f"{chat} line 1")]


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_the_loss_is_on_exactly_the_completion_and_end_of_text(tmp_path, mask_prompt):
    rows = [{"prompt": f"Sentence {i}: Sales rose .\nSentiment:", "completion": " positive"} for i in range(20)]
    source = _jsonl(tmp_path / "rows.jsonl", rows)
    run = prepare(load_recipe(DEMO, ["task={name: instruction, mask_prompt: %s}" % str(mask_prompt).lower(),
                                     f"data.source={source}"]), "torch")
    tokenizer = run.encoder.tokenizer
    eos = tokenizer.token_to_id("<|endoftext|>")
    example = run.splits["train"][0]
    prompt = tokenizer.encode(rows[0]["prompt"], add_special_tokens=False).ids
    completion = tokenizer.encode(" positive", add_special_tokens=False).ids
    batch = make_batch([example])
    ids = example.ids.tolist()
    assert ids[-1] == eos and ids[-len(completion) - 1:-1] == completion
    if mask_prompt:
        first = len(ids) - len(completion) - 1  # the completion's first token
        assert batch.targets.tolist() == completion + [eos]
        assert batch.target_positions.tolist() == list(range(first - 1, len(ids) - 1))
        assert len(prompt) == first
    else:
        assert batch.targets.tolist() == ids[1:] and batch.target_positions.tolist() == list(range(len(ids) - 1))


def test_packed_rows_hold_whole_examples_and_their_completions_only(tmp_path):
    rows = [{"prompt": f"Sentence {i}: Sales rose .\nSentiment:", "completion": " positive" if i % 2 else " negative"}
            for i in range(30)]
    source = _jsonl(tmp_path / "rows.jsonl", rows)
    recipe = ["task={name: instruction, packing: %s}", f"data.source={source}", "data.max_length=40"]
    unpacked, packed = (prepare(load_recipe(DEMO, [recipe[0] % flag, *recipe[1:]]), "torch") for flag in ("false", "true"))
    for split in ("train", "validation", "test"):
        examples, packed_rows = unpacked.splits[split], packed.splits[split]
        assert all(len(row.ids) <= 40 for row in packed_rows) and len(packed_rows) < len(examples)
        assert np.concatenate([row.ids for row in packed_rows]).tolist() == np.concatenate(
            [e.ids for e in examples]).tolist()  # the split's examples, in order, none cut
        # the targets: exactly every example's completion and end-of-text, each predicted from the token before
        whole, rows_batch = make_batch(examples), make_batch(packed_rows)
        assert rows_batch.targets.tolist() == whole.targets.tolist()
        width = rows_batch.input_ids.shape[1]
        for position, target in zip(rows_batch.target_positions, rows_batch.targets):
            row, t = divmod(int(position), width)
            assert rows_batch.input_ids[row, t + 1] == target and t + 1 >= 1


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-3), ("float64", 1e-9)])
@pytest.mark.parametrize("packing", ["false", "true"])
def test_twenty_steps_give_the_same_losses_on_both_backends(dtype, tolerance, packing):
    overrides = [f"task={{name: instruction, packing: {packing}}}", "data.synthetic_size=90", "train.batch_size=4",
                 "train.max_steps=20", "train.warmup_steps=0", f"dtype={dtype}"]
    runs = {b: prepare(load_recipe(DEMO, overrides), b) for b in ("mlx", "torch")}
    losses = {b: np.array([train_step(run, step)["loss"] for step in range(20)]) for b, run in runs.items()}
    assert np.abs(losses["mlx"] - losses["torch"]).max() / losses["torch"].max() < tolerance
    assert losses["torch"][-5:].mean() < 0.6 * losses["torch"][:5].mean()  # it learns the label words
    reports = {b: evaluate(run) for b, run in runs.items()}
    assert abs(reports["mlx"].loss - reports["torch"].loss) / reports["torch"].loss < tolerance


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "Q:"}], "line 1 has no completion: no field 'completion'"),
    ([{"messages": "Hi"}], "column 'messages' must be a list of {role, content} messages"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}], "the conversation has no assistant message"),
    ([{"instruction": "Name it.", "output": "x"}], "has no field 'input', which task.template"),
])
def test_bad_rows_are_one_sentence(tmp_path, rows, match):
    source = _jsonl(tmp_path / "bad.jsonl", rows)
    template = ALPACA if "instruction" in rows[0] else "{prompt}"
    with pytest.raises(TwintuneError, match=match):
        load_pairs(source, template, "output" if "instruction" in rows[0] else "completion")


def test_a_template_without_a_field_is_refused_when_the_recipe_is_read():
    with pytest.raises(TwintuneError, match="names no field"):
        load_recipe(DEMO, ["task={name: instruction, template: 'Answer:'}"])
