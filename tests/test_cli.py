"""The CLI: a real (tiny) training run, and bad input answered with one line and exit 2."""

import json
import subprocess
import sys

import pytest

from twintune.cli import main

REQUIRED = {"backend", "method", "steps", "final_train_loss", "train_losses", "val_accuracy",
            "val_macro_f1", "train_seconds", "peak_memory_mb"}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_train_writes_run_directory(tmp_path, backend):
    out = tmp_path / "run"
    code = main(["train", "recipes/demo-financial-sentiment.yaml", "--backend", backend, "--out", str(out),
                 "--set", "train.max_steps=4", "--set", "data.synthetic_size=60", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert REQUIRED <= set(summary)
    assert summary["backend"] == backend and summary["method"] == "lora" and summary["steps"] == 4
    assert len(summary["train_losses"]) == 4
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # peak_memory_mb is the process's peak RSS on both backends; the framework's own peak is named apart
    from twintune.machine import peak_rss_mb

    assert 0 < summary["peak_memory_mb"] <= peak_rss_mb()
    framework = summary["framework_peak_memory_mb"]
    assert framework is None if backend == "torch" else 0 < framework < summary["peak_memory_mb"]


BAD = [
    (["--set", "train.lrr=1"], "recipe key 'train.lrr' is unknown; did you mean 'train.lr'?"),
    (["--set", "method.r=-2"], "method.r"),
    (["--set", "train.lr=fast"], "train.lr"),
    (["--set", "method.r=1000"], "larger than layer"),
    (["--set", "method.target_modules=[q_proj,qq_proj]"], "qq_proj"),
    (["--backend", "gpu"], "unknown backend 'gpu'"),
    (["--set", "model=/no/such/model"], "does not exist"),
    (["--set", "data.source=/no/such/file.csv"], "does not exist"),
    (["--set", "data.max_length=8"], "longer than data.max_length=8"),
    (["--set", "prompt.template=no placeholder"], "{text}"),
]


@pytest.mark.parametrize("extra,fragment", BAD)
def test_bad_input_gets_one_line_and_exit_2(tmp_path, extra, fragment):
    proc = subprocess.run(
        [sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml",
         "--out", str(tmp_path / "run"), "--no-progress", *extra],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0]


def test_unknown_label_in_a_data_file(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\nProfit rose .,positive\nCosts fell .,bullish\n")
    proc = subprocess.run(
        [sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml", "--no-progress",
         "--out", str(tmp_path / "run"), "--set", f"data.source={data}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "bullish" in proc.stderr and "Traceback" not in proc.stderr


def test_recipe_file_missing_or_not_yaml(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not valid YAML" in err


def test_methods_lists_every_method_with_its_keys_and_defaults(capsys):
    from twintune.methods import METHODS, method_keys

    assert main(["methods"]) == 0
    shown = capsys.readouterr().out
    for name, cls in METHODS.items():
        assert f"{name} " in shown and cls.description in shown
        for key, default in method_keys(cls).items():
            assert f"{key}: {list(default) if isinstance(default, tuple) else default}" in shown
    assert "rank_pattern: {}" in shown and "n: 2" in shown and "feedforward_modules: ['c_proj']" in shown


# ---- papercuts (issue 28) ----------------------------------------------------------------------------

def test_version_names_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"twintune {version('twintune')}"


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path):
    """`twintune eval ... | head -1`: the pipe closes after one line; twintune stops quietly."""
    proc = subprocess.run(f"{sys.executable} -m twintune eval recipes/demo-financial-sentiment.yaml --split test "
                          "--backend torch | head -1", shell=True, capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("test split, ") and proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_a_csv_without_the_label_column_names_the_recipe_key(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,sentiment\nProfit rose .,positive\n")
    assert main(["train", "recipes/demo-financial-sentiment.yaml", "--no-progress", "--out", str(tmp_path / "run"),
                 "--set", f"data.source={data}"]) == 2
    assert ("has no column 'label'; its columns are text, sentiment; set data.label_column to the column that "
            "holds it.") in capsys.readouterr().err


def test_a_max_length_beyond_the_model_is_said_and_nf4_on_cpu_says_nothing_a_user_cannot_act_on(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml",
                           "--backend", "torch", "--no-progress", "--out", str(tmp_path / "run"), "--set",
                           "train.max_steps=1", "--set", "data.max_length=4096", "--set", "quantize.type=nf4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ("twintune: warning: data.max_length 4096 is beyond the model's 512 positions; rows are cut at 512."
            in proc.stderr)
    assert "kernels" not in proc.stderr and "trust_remote_code" not in proc.stderr, proc.stderr
