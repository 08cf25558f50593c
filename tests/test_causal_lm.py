"""The causal-LM task (task: causal_lm): documents packed into rows exactly, the loss on every token
after a row's first, the same losses on both backends, perplexity that falls as it trains."""

import json

import numpy as np
import pytest

from twintune.data.batching import make_batch
from twintune.data.documents import load_documents, lm_rows, one_per_row, pack
from twintune.errors import TwintuneError
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate
from twintune.train.loop import train
from twintune.train.runs import evaluate_split

DEMO = "recipes/demo-financial-sentiment.yaml"
BACKENDS = ["mlx", "torch"]


def _recipe(*overrides):
    return load_recipe(DEMO, ["task=causal_lm", "data.synthetic_size=60", "data.max_length=32",
                              "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0", *overrides])


def test_packing_puts_exactly_the_documents_and_end_of_text_tokens_in_each_row():
    documents = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35], [41]]
    rows = pack(documents, length=4, eos=0)
    assert [row.tolist() for row in rows] == [[11, 12, 13, 0], [21, 22, 0, 31], [32, 33, 34, 35], [0, 41, 0]]
    assert all(row.dtype == np.int32 for row in rows)
    assert [row.tolist() for row in pack([[1, 2, 3]], length=2, eos=0)] == [[1, 2], [3, 0]]
    assert [row.tolist() for row in pack([[1, 2, 3, 4]], length=2, eos=0)] == [[1, 2], [3, 4]]  # a lone eos row: dropped
    assert [row.tolist() for row in one_per_row(documents, length=4, eos=0)] == [
        [11, 12, 13, 0], [21, 22, 0], [31, 32, 33, 34], [35, 0], [41, 0]]


def test_every_token_after_a_rows_first_is_a_target_and_padding_is_none():
    batch = make_batch(lm_rows([np.array([5, 6, 7, 0], np.int32), np.array([8, 9], np.int32)]))
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch.target_positions.tolist() == [0, 1, 2, 4]  # logits at t predict token t + 1
    assert batch.targets.tolist() == [6, 7, 0, 9]
    assert batch.n_real_tokens == 6


def test_documents_come_from_text_jsonl_and_datasets_files(tmp_path):
    (tmp_path / "docs.txt").write_text("Sales rose .\n\nCosts fell sharply .\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "Sales rose ."}) + "\n" + json.dumps({"body": "Costs fell ."}))
    assert load_documents(str(tmp_path / "docs.txt")) == ["Sales rose .", "Costs fell sharply ."]
    assert load_documents(str(tmp_path / "docs.jsonl"), text_column="body") == ["Sales rose .", "Costs fell ."]
    import pandas

    pandas.DataFrame({"text": ["Profit rose .", "Loss widened ."]}).to_parquet(tmp_path / "docs.parquet")
    assert load_documents(str(tmp_path / "docs.parquet")) == ["Profit rose .", "Loss widened ."]
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(TwintuneError, match="blank.jsonl document 1 is empty"):
        load_documents(str(tmp_path / "blank.jsonl"))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-3), ("float64", 1e-9)])
def test_twenty_steps_give_the_same_losses_and_perplexity_on_both_backends(dtype, tolerance):
    runs = {b: prepare(_recipe(f"dtype={dtype}", "train.max_steps=20"), b) for b in BACKENDS}
    assert all(len(row.ids) == 32 for row in runs["torch"].splits["train"][:-1])  # packed full rows
    losses = {b: np.array([train_step(run, step)["loss"] for step in range(20)]) for b, run in runs.items()}
    assert np.abs(losses["mlx"] - losses["torch"]).max() / losses["torch"].max() < tolerance
    reports = {b: evaluate(run) for b, run in runs.items()}
    assert abs(reports["mlx"].loss - reports["torch"].loss) / reports["torch"].loss < tolerance
    assert reports["mlx"].tokens == reports["torch"].tokens > 0


def test_a_causal_lm_run_lowers_its_validation_perplexity_and_reports_it(tmp_path):
    recipe = _recipe("train.max_steps=40", "train.eval_every=20", "method.r=4")
    before = evaluate(prepare(recipe, "torch")).perplexity
    summary = train(recipe, "torch", tmp_path / "run", progress=False)
    assert summary["task"] == {"name": "causal_lm", "packing": True}
    assert summary["val_perplexity"] < 0.9 * before
    assert [e["step"] for e in summary["evals"]] == [20, 40] and "val_accuracy" not in summary
    evaluation = evaluate_split(tmp_path / "run", "test", "mlx")
    assert evaluation.to_dict()["perplexity"] > 1 and evaluation.text().startswith("test split, ")
    with pytest.raises(TwintuneError, match="is a causal_lm run: it predicts next tokens, not labels"):
        from twintune.train.runs import predict_texts

        predict_texts(tmp_path / "run", ["Sales rose ."], "torch")


def test_without_packing_each_document_starts_its_own_padded_row():
    run = prepare(_recipe("task={name: causal_lm, packing: false}", "data.max_length=128"), "torch")
    eos = run.encoder.tokenizer.token_to_id("<|endoftext|>")
    assert all(row.ids[-1] == eos and eos not in row.ids[:-1] for row in run.splits["train"])  # one sentence each
    assert len({len(row.ids) for row in run.splits["train"]}) > 1
