"""`twintune compare`: a few entries on the tiny model, each in its own process, on both backends.

The same comparison on MLX and torch gives the same accuracies (the parity the method tests prove,
seen through the whole command), its files hold every column, a failed entry is a row with its
sentence, and --resume runs only what is missing.
"""

import json
import subprocess
import sys

import pytest

from twintune.compare import ENTRIES, choose_entries, entry_overrides, markdown_table, summarise
from twintune.errors import TwintuneError

DEMO = "recipes/demo-financial-sentiment.yaml"
SMALL = ["train.max_steps=4", "data.synthetic_size=150", "train.batch_size=8"]
COLUMNS = {"entry", "family", "seeds", "finished", "errors", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std",
           "trainable_parameters", "trainable_percent", "adapter_bytes", "peak_rss_mb", "estimate_mb",
           "seconds_per_step", "tokens_per_second", "total_seconds", "optimizer"}


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory):
    """lora, a head and zero-shot prompting, one seed, on each backend (each row its own process)."""
    from twintune.compare import compare

    root = tmp_path_factory.mktemp("compare")
    return {backend: compare(DEMO, "lora,head,zero-shot", backend, seeds=1, out_dir=root / backend, overrides=SMALL,
                             progress=False)
            for backend in ("mlx", "torch")}


def test_the_plot_s_legend_covers_no_point(comparisons):
    import matplotlib.pyplot as plt

    from twintune.compare import comparison_figure

    figure = comparison_figure(comparisons["torch"])
    figure.canvas.draw()
    axis = figure.axes[0]
    legend = axis.get_legend().get_window_extent()
    points = axis.transData.transform([(x, y) for collection in axis.collections
                                       for x, y in collection.get_offsets()])
    assert len(points) >= 3 and not any(legend.contains(x, y) for x, y in points)
    plt.close(figure)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_comparison_writes_its_table_plot_and_rows(comparisons, backend):
    result = comparisons[backend]
    out = result["out_dir"]
    written = json.loads(open(f"{out}/compare.json").read())
    assert written["backend"] == backend and written["methods"] == ["lora", "head", "zero-shot"]
    assert written["machine"]["cpu_flags"] is not None and written["machine"]["cores"] >= 1
    assert [line["entry"] for line in written["table"]] == ["lora", "head", "zero-shot"]
    for line in written["table"]:
        assert set(line) == COLUMNS and line["finished"] == 1 and not line["errors"]
        assert 0 <= line["accuracy"] <= 1 and line["peak_rss_mb"] > 0 and line["total_seconds"] > 0
    lora, head, zero = written["table"]
    assert lora["trainable_parameters"] == 36_864 and 0 < lora["trainable_percent"] < 100  # r 8 on all six layer types
    assert head["trainable_parameters"] == 3 * 64 and head["adapter_bytes"] > 0  # the head alone: 3 x 64, no bias
    assert zero["trainable_parameters"] == 0 and zero["seconds_per_step"] is None and zero["estimate_mb"] is None
    assert lora["seconds_per_step"] > 0 and lora["tokens_per_second"] > 0 and lora["estimate_mb"] > 0
    table = open(f"{out}/compare.md").read()
    assert f"on {backend}" in table and f"backend **{backend}**" in table and "CPU flags:" in table
    assert all(f"| {name} |" in table for name in ("lora", "head", "zero-shot"))
    assert [line["optimizer"] for line in written["table"]] == ["adamw", "adamw", None]  # prompting trains nothing
    assert "| lora | weight methods | adamw |" in table and "| zero-shot | prompting | – |" in table
    assert open(f"{out}/compare.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    row = json.loads(open(f"{out}/rows/lora-seed0/row.json").read())
    assert row["status"] == "ok" and row["backend"] == backend and row["steps"] == 4


def test_both_backends_give_the_same_accuracies(comparisons):
    for mlx_line, torch_line in zip(comparisons["mlx"]["table"], comparisons["torch"]["table"]):
        examples = comparisons["torch"]["rows"][0]["test_examples"]
        # float32 parity: a prediction may flip only on a near-tie, one sentence at most
        assert abs(mlx_line["accuracy"] - torch_line["accuracy"]) <= 1 / examples + 1e-12, (mlx_line, torch_line)
        assert mlx_line["trainable_parameters"] == torch_line["trainable_parameters"]


def test_resume_runs_only_the_missing_rows_and_a_failed_entry_is_a_row(comparisons, tmp_path):
    from twintune.compare import compare

    out = comparisons["torch"]["out_dir"]
    kept = open(f"{out}/rows/lora-seed0/row.json").read()
    # a second seed for lora, and few-shot with more shots than the smallest class holds
    result = compare(DEMO, "lora,few-shot", "torch", seeds=2, out_dir=out, overrides=SMALL, resume=True, shots=500,
                     progress=False)
    assert open(f"{out}/rows/lora-seed0/row.json").read() == kept  # finished: not run again
    lora, few = result["table"]
    assert lora["finished"] == 2 and lora["accuracy_std"] is not None
    assert few["finished"] == 0 and len(few["errors"]) == 1 and "--shots" in few["errors"][0]
    assert "| few-shot | prompting | | failed: " in open(f"{out}/compare.md").read()


def test_the_cli_prints_the_table(tmp_path):
    result = subprocess.run([sys.executable, "-m", "twintune", "compare", DEMO, "--methods", "zero-shot", "--backend",
                             "torch", "--out", str(tmp_path / "c"), "--no-progress",
                             *[arg for item in SMALL for arg in ("--set", item)]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| zero-shot | prompting |" in result.stdout and "compare [1/1] zero-shot seed 0 on torch" in result.stderr


# ---- the pieces, without running anything ----------------------------------------------------------

def test_set_values_reach_every_entry_or_the_one_they_name():
    overrides = ["train.epochs=2", "lora.r=16", "lora.train.lr=1e-3", "prompt.n=5", "prompt.template={text} is"]
    lora = entry_overrides(ENTRIES["lora"], 7, 8, overrides)
    assert lora[:2] == list(ENTRIES["lora"].overrides)
    shared = ["train.epochs=2", "prompt.template={text} is"]  # the recipe's prompt section, for every entry
    assert lora[2:] == ["data.seed=7", "seed=8", *shared, "method.r=16", "train.lr=1e-3"]
    assert entry_overrides(ENTRIES["prompt"], 0, 0, overrides)[-3:] == [*shared, "method.n=5"]  # prompt tuning's n
    assert entry_overrides(ENTRIES["bitfit"], 0, 1, overrides)[-4:] == ["data.seed=0", "seed=1", *shared]
    # the optimizer: for every entry, or for one
    from twintune.recipe import load_recipe

    for items, lora_optimizer, full_optimizer in ((["train.optimizer.name=lion"], "lion", "lion"),
                                                  (["full.train.optimizer.name=adamw8bit"], "adamw", "adamw8bit")):
        chosen = {name: load_recipe(DEMO, entry_overrides(ENTRIES[name], 0, 0, items)).train.optimizer.name
                  for name in ("lora", "full")}
        assert chosen == {"lora": lora_optimizer, "full": full_optimizer}


def test_the_entries_load_as_recipes_and_seeds_keep_the_data():
    from twintune.recipe import load_recipe

    for entry in ENTRIES.values():
        recipe = load_recipe(DEMO, entry_overrides(entry, 0, 3, []))
        assert recipe.seed == 3 and recipe.data_seed == 0
    assert [e.name for e in choose_entries("full, lora")] == ["full", "lora"]
    with pytest.raises(TwintuneError, match="did you mean 'ptuning'"):
        choose_entries("ptunin")


def test_the_table_averages_the_seeds_that_finished():
    rows = [{"entry": "lora", "status": "ok", "accuracy": a, "macro_f1": f, "trainable_parameters": 10,
             "adapter_bytes": 100, "peak_rss_mb": 50.0, "estimate_mb": 5.0, "seconds_per_step": 0.1,
             "tokens_per_second": 1000.0, "total_seconds": 3.0, "model_parameters": 1000, "optimizer": "lion8bit"}
            for a, f in ((0.8, 0.7), (0.9, 0.8))]
    rows.append({"entry": "lora", "status": "failed", "error": "out of memory."})
    (line,) = summarise(rows, [ENTRIES["lora"]])
    assert line["seeds"] == 3 and line["finished"] == 2 and line["errors"] == ["out of memory."]
    assert line["accuracy"] == pytest.approx(0.85) and line["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert line["trainable_percent"] == pytest.approx(1.0)
    table = markdown_table({"recipe": DEMO, "recipe_name": "demo", "backend": "mlx", "seeds": 3, "table": [line],
                            "machine": {"cpu_model": "x", "cores": 2, "cpu_flags": ["avx2"]}})
    assert "| lora | weight methods | lion8bit | 0.850 ± 0.071 | 0.750 ± 0.071 | 10 | 1 |" in table
    assert "| lora (failed seeds) | | | out of memory. |" in table
