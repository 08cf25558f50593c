"""Loading labelled sentences from files, the hub and the synthetic set; splitting them."""

import collections
import json
import zipfile

import pytest

from twintune.data import sources
from twintune.data.sources import Example, load_examples, naive_bayes_unigram_accuracy, stratified_split
from twintune.errors import TwintuneError


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


# --- local files -------------------------------------------------------------------------------


def test_txt_round_trip_latin1_with_at_in_sentence(tmp_path):
    path = _write(
        tmp_path / "Sentences_AllAgree.txt",
        "Operating profit rose to EUR 3 mn .@positive\n"
        "Caf\u00e9 chain Aromi @ Helsinki was unchanged .@neutral\n"
        "\n"
        "Net sales fell .@negative\n",
        encoding="latin-1",
    )
    assert load_examples(path) == [
        Example("Operating profit rose to EUR 3 mn .", "positive"),
        Example("Caf\u00e9 chain Aromi @ Helsinki was unchanged .", "neutral"),
        Example("Net sales fell .", "negative"),
    ]


def test_csv_round_trip_with_string_and_integer_labels(tmp_path):
    path = _write(
        tmp_path / "data.csv",
        'sentence,sentiment\n"Sales rose , a lot .",positive\nCosts rose .,0\nA note .,1\n',
    )
    examples = load_examples(path, text_column="sentence", label_column="sentiment")
    assert examples == [
        Example("Sales rose , a lot .", "positive"),
        Example("Costs rose .", "negative"),
        Example("A note .", "neutral"),
    ]


def test_jsonl_round_trip_with_string_and_integer_labels(tmp_path):
    rows = [
        {"text": "Profit rose .", "label": 2},
        {"text": "Debt rose .", "label": "negative"},
        {"text": "Caf\u00e9 .", "label": 1},
    ]
    path = _write(tmp_path / "data.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert load_examples(path) == [
        Example("Profit rose .", "positive"),
        Example("Debt rose .", "negative"),
        Example("Caf\u00e9 .", "neutral"),
    ]


# --- through `datasets`: hf:ORG/NAME, parquet, JSON ----------------------------------------------

LABELS = ("negative", "neutral", "positive")


def test_parquet_with_a_class_label_column_gives_its_names(tmp_path):
    import datasets

    # the ClassLabel's order differs from the recipe's: its names decide, not its integers
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "sentiment": datasets.ClassLabel(names=["positive", "Negative", "neutral"])})
    table = datasets.Dataset.from_dict({"sentence": ["Profit rose .", "Debt rose .", "A note ."],
                                        "sentiment": [0, 1, 2]}, features=features)
    path = str(tmp_path / "data.parquet")
    table.to_parquet(path)
    assert load_examples(path, text_column="sentence", label_column="sentiment", labels=LABELS) == [
        Example("Profit rose .", "positive"), Example("Debt rose .", "negative"), Example("A note .", "neutral")]


def test_datasets_reads_csv_and_jsonl_as_the_built_in_readers_do(tmp_path):
    csv_path = _write(tmp_path / "data.csv", 'text,label\n"Sales rose , a lot .",positive\nCosts rose .,negative\n'
                                             "A note .,neutral\n")
    rows = [{"text": "Profit rose .", "label": 2}, {"text": "Debt rose .", "label": 0}, {"text": "Caf\u00e9 .", "label": 1}]
    jsonl_path = _write(tmp_path / "data.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    for path in (csv_path, jsonl_path):
        built_in = load_examples(path, labels=LABELS)
        assert sources.load_with_datasets(path, "text", "label", LABELS) == built_in
        assert len(built_in) == 3


def test_a_json_array_file_is_read_through_datasets(tmp_path):
    rows = [{"body": "Profit rose .", "tone": "positive"}, {"body": "Debt rose .", "tone": "negative"}]
    path = _write(tmp_path / "data.json", json.dumps(rows))
    assert load_examples(path, text_column="body", label_column="tone", labels=LABELS) == [
        Example("Profit rose .", "positive"), Example("Debt rose .", "negative")]


def test_datasets_sources_refuse_a_missing_column_and_an_unknown_label(tmp_path):
    import datasets

    path = str(tmp_path / "data.parquet")
    datasets.Dataset.from_dict({"text": ["Sales rose ."], "polarity": ["bullish"]}).to_parquet(path)
    with pytest.raises(TwintuneError, match=r"has no column 'label'; its columns are text, polarity"):
        load_examples(path, labels=LABELS)
    with pytest.raises(TwintuneError, match=r"unknown label 'bullish'; allowed labels are negative, neutral, positive"):
        load_examples(path, label_column="polarity", labels=LABELS)


def test_an_unreachable_hub_data_set_is_one_sentence(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(TwintuneError, match=r"data set 'hf:takala/financial_phrasebank' \(split 'train'\) cannot be "
                                            r"loaded from the Hugging Face hub: .*"):
        load_examples("hf:takala/financial_phrasebank", labels=LABELS)


def test_synthetic_source():
    examples = load_examples("synthetic", synthetic_size=30, seed=1)
    assert len(examples) == 30
    assert examples == load_examples("synthetic", synthetic_size=30, seed=1)


# --- errors ------------------------------------------------------------------------------------


def _error(source, **kwargs) -> str:
    with pytest.raises(TwintuneError) as info:
        load_examples(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    message = _error(str(tmp_path / "nope.csv"))
    assert "does not exist" in message and "nope.csv" in message


def test_unknown_extension(tmp_path):
    path = _write(tmp_path / "data.xlsx", "x")
    message = _error(path)
    assert "data.xlsx" in message and "unsupported" in message


def test_a_corrupt_parquet_file_is_one_sentence(tmp_path):
    path = _write(tmp_path / "data.parquet", "x")
    assert _error(path).startswith(f"{path} cannot be read as parquet: ")  # then pyarrow's own first line


def test_unknown_source_name():
    message = _error("imdb")
    assert "unknown data source 'imdb'" in message and "synthetic" in message


def test_txt_line_without_at(tmp_path):
    path = _write(tmp_path / "d.txt", "Fine .@neutral\nNo label here\n")
    message = _error(path)
    assert "line 2" in message and "'@'" in message


def test_unknown_label_names_label_line_and_allowed(tmp_path):
    path = _write(tmp_path / "d.txt", "Fine .@neutral\nGreat .@bullish\n")
    message = _error(path)
    assert "'bullish'" in message and "line 2" in message and "negative, neutral, positive" in message


def test_integer_label_out_of_range(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "x", "label": 7}\n')
    message = _error(path)
    assert "7" in message and "line 1" in message


def test_missing_csv_column(tmp_path):
    path = _write(tmp_path / "d.csv", "sentence,label\nx,positive\n")
    message = _error(path)
    assert "'text'" in message and "sentence, label" in message


def test_missing_jsonl_key(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "x", "label": "positive"}\n{"text": "y"}\n')
    message = _error(path)
    assert "line 2" in message and "'label'" in message


def test_invalid_json_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "x", "label": "positive"}\n{oops\n')
    message = _error(path)
    assert "line 2" in message and "JSON" in message


def test_empty_text_is_an_error_naming_the_line(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\nfine,positive\n   ,neutral\n")
    message = _error(path)
    assert "line 3" in message and "empty text" in message
    path = _write(tmp_path / "d.txt", "fine@positive\n @neutral\n")
    assert "line 2" in _error(path)


def test_empty_data_set(tmp_path):
    for name, text in (("e.txt", "\n\n"), ("e.csv", "text,label\n"), ("e.jsonl", "")):
        message = _error(_write(tmp_path / name, text))
        assert "no examples" in message and name in message


def test_unknown_subset():
    message = _error("financial_phrasebank", subset="sentences_90agree")
    assert "sentences_90agree" in message and "sentences_allagree" in message


# --- financial_phrasebank from the hub ------------------------------------------------------


def test_financial_phrasebank_offline_gives_one_clear_sentence(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    # The constants are read at import time, so patch them as well as the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(TwintuneError) as info:
        load_examples("financial_phrasebank")
    message = str(info.value)
    assert "cannot be reached" in message and "financial_phrasebank" in message
    assert "local file" in message and "Sentences_AllAgree.txt" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_financial_phrasebank_reads_subset_by_basename(monkeypatch, tmp_path):
    import huggingface_hub

    archive = tmp_path / "fpb.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        text = "Sales rose .@positive\nCaf\u00e9 .@neutral\n"
        bundle.writestr("SomeOtherFolder/Sentences_75Agree.txt", text.encode("latin-1"))
        bundle.writestr("SomeOtherFolder/Sentences_AllAgree.txt", b"Costs rose .@negative\n")

    def fake_download(repo_id, filename, repo_type):
        assert repo_id == sources.FINANCIAL_PHRASEBANK_REPO and repo_type == "dataset"
        assert filename == sources.FINANCIAL_PHRASEBANK_ZIP
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_examples("financial_phrasebank", subset="sentences_75agree") == [
        Example("Sales rose .", "positive"),
        Example("Caf\u00e9 .", "neutral"),
    ]
    assert load_examples("financial_phrasebank") == [Example("Costs rose .", "negative")]
    assert "Sentences_50Agree.txt" in _error("financial_phrasebank", subset="sentences_50agree")


# --- splitting ---------------------------------------------------------------------------------


def _toy(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label) for label, n in counts.items() for i in range(n)]


def test_stratified_split_keeps_proportions_and_covers_everything():
    data = _toy({"negative": 100, "neutral": 300, "positive": 200})
    splits = stratified_split(data, {"validation": 0.1, "test": 0.2}, seed=0)
    assert list(splits) == ["train", "validation", "test"]
    assert sorted(e.text for part in splits.values() for e in part) == sorted(e.text for e in data)
    for name, fraction in (("validation", 0.1), ("test", 0.2), ("train", 0.7)):
        counts = collections.Counter(e.label for e in splits[name])
        sizes = {"negative": 100, "neutral": 300, "positive": 200}
        assert counts == {label: round(n * fraction) for label, n in sizes.items()}


def test_stratified_split_is_deterministic_and_shuffled():
    data = _toy({"negative": 50, "neutral": 50, "positive": 50})
    first = stratified_split(data, {"test": 0.2}, seed=7)
    assert first == stratified_split(data, {"test": 0.2}, seed=7)
    assert first != stratified_split(data, {"test": 0.2}, seed=8)
    labels = [e.label for e in first["train"]]
    assert labels != sorted(labels)


def test_stratified_split_gives_small_classes_one_example_per_split():
    data = _toy({"negative": 3, "neutral": 40, "positive": 5})
    splits = stratified_split(data, {"validation": 0.1, "test": 0.1}, seed=0)
    for part in splits.values():
        assert {e.label for e in part} == {"negative", "neutral", "positive"}


@pytest.mark.parametrize(
    "fractions, fragment",
    [
        ({"test": 1.0}, "[0, 1)"),
        ({"test": -0.1}, "[0, 1)"),
        ({"a": 0.6, "b": 0.5}, "sum"),
        ({"train": 0.5}, "'train'"),
    ],
)
def test_stratified_split_validates_fractions(fractions, fragment):
    with pytest.raises(TwintuneError) as info:
        stratified_split(_toy({"neutral": 10}), fractions, seed=0)
    assert fragment in str(info.value)


def test_naive_bayes_unigram_learns_keywords():
    train = [Example("bad awful", "negative"), Example("good great", "positive")] * 5
    test = [Example("awful day", "negative"), Example("great day", "positive")]
    assert naive_bayes_unigram_accuracy(train, test) == 1.0


def test_a_recipe_reads_a_parquet_source_as_it_reads_the_same_csv(tmp_path):
    """The recipe's data.source reaches `datasets`; the splits equal those of the built-in CSV reader."""
    import datasets

    from twintune.recipe import load_recipe
    from twintune.train.build import prepare

    examples = load_examples("synthetic", synthetic_size=60, seed=3)
    table = {"text": [e.text for e in examples], "label": [e.label for e in examples]}
    datasets.Dataset.from_dict(table).to_parquet(str(tmp_path / "data.parquet"))
    datasets.Dataset.from_dict(table).to_csv(str(tmp_path / "data.csv"), index=False)
    splits = {}
    for name in ("data.parquet", "data.csv"):
        run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", [f"data.source={tmp_path / name}"]), "torch")
        splits[name] = {split: [e.ids.tolist() for e in encoded] for split, encoded in run.splits.items()}
    assert splits["data.parquet"] == splits["data.csv"]
    assert sum(len(v) for v in splits["data.csv"].values()) == 60
