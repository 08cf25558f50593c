"""train.report_to and train.log_every: TensorBoard event files and W&B's offline run hold the same
scalars as metrics.jsonl under transformers' names, on both backends, written once by 2 processes and
once per step by a resumed run; the console line; a missing reporter library is one sentence."""

import glob
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from twintune.errors import TwintuneError
from twintune.recipe import load_recipe
from twintune.train.loop import train
from twintune.train.reporting import read_tensorboard, reported

DEMO = "recipes/demo-financial-sentiment.yaml"
SETTINGS = ["train.max_steps=12", "data.synthetic_size=120", "train.batch_size=8", "train.eval_every=5",
            "train.log_every=5"]
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
       "WANDB_SILENT": "true"}


def _train(out, backend, report_to, nproc=None):
    argv = [sys.executable, "-m", "twintune", "train", DEMO, "--backend", backend, "--out", str(out), "--no-progress",
            *[a for item in [*SETTINGS, f"train.report_to=[{', '.join(report_to)}]"] for a in ("--set", item)],
            *(["--nproc", str(nproc)] if nproc else [])]
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each backend: one process reporting to TensorBoard and W&B (offline), two to TensorBoard."""
    root = tmp_path_factory.mktemp("reporting")
    for backend in ("torch", "mlx"):
        _train(root / f"{backend}-1", backend, ["tensorboard", "wandb"])
        _train(root / f"{backend}-2", backend, ["tensorboard"], nproc=2)
    return root


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _assert_same_scalars(board, lines):
    """Every scalar of every metrics.jsonl line, at its step, once (TensorBoard keeps float32)."""
    expected = {}
    for line in lines:
        for name, value in reported(line).items():
            expected.setdefault(name, []).append((line["step"], value))
    _assert_holds(board, expected)


def _assert_holds(board, expected):
    timing = {"train/tokens_per_second", "train/peak_memory_mb"}
    assert set(board) - timing == set(expected)
    for name, points in expected.items():
        assert [step for step, _ in board[name]] == [step for step, _ in points], name
        for (_, got), (_, want) in zip(board[name], points):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-30), name
    # tokens/s and peak memory every train.log_every steps, beside the console line
    for name in timing:
        assert [step for step, _ in board[name]] == [5, 10] and all(v > 0 for _, v in board[name]), name


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_tensorboard_holds_the_scalars_of_metrics_jsonl(runs, backend, processes):
    out = runs / f"{backend}-{processes}"
    lines = _metrics(out)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/accuracy", "eval/macro_f1"} <= {
        name for line in lines for name in reported(line)}
    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 1  # written once, by rank 0
    _assert_same_scalars(read_tensorboard(out / "tensorboard"), lines)


def _wandb_records(path):
    """The records of a W&B offline run file (its LevelDB-log layout: a 7-byte header, then 32 KiB
    blocks of records, each with a CRC-32 of its type and data)."""
    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    at, pending = 7, b""
    while at + 7 <= len(data):
        left = 32768 - at % 32768
        checksum, length, kind = struct.unpack("<IHB", data[at:at + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of a block
            at += left
            continue
        body = data[at + 7: at + 7 + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == checksum
        at, pending = at + 7 + length, pending + body
        if kind in (1, 4):  # a whole record, or its last piece
            yield pending
            pending = b""


def _wandb_history(out):
    (run,) = glob.glob(str(out / "wandb" / "offline-run-*"))
    return _wandb_history_of(run)


def _wandb_history_of(run):
    from wandb.proto import wandb_internal_pb2

    history = {}
    (path,) = glob.glob(str(Path(run) / "run-*.wandb"))
    for raw in _wandb_records(path):
        record = wandb_internal_pb2.Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, []).append((step, value))
    return history


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_wandb_offline_holds_the_steps_every_log_every_steps_and_each_evaluation(runs, backend):
    """As transformers' logging_steps: steps 1-5, 6-10 and 11-12 as one record each, at their last step,
    the steps' mean loss (and other figures), the last step's learning rate and gradient norm; each
    evaluation as metrics.jsonl has it."""
    lines = _metrics(runs / f"{backend}-1")
    steps = {line["step"]: line for line in lines if "loss" in line and "lr" in line}
    assert sorted(steps) == list(range(1, 13))
    expected = {}
    for first, last in ((1, 5), (6, 10), (11, 12)):
        window = [steps[step] for step in range(first, last + 1)]
        for name in reported(window[0]):
            mean = sum(reported(line)[name] for line in window) / len(window)
            last_value = reported(window[-1])[name]
            value = last_value if name in ("train/learning_rate", "train/grad_norm") else mean
            expected.setdefault(name, []).append((last, value))
    for line in lines:
        if "loss" not in line:
            for name, value in reported(line).items():
                expected.setdefault(name, []).append((line["step"], value))
    assert expected["train/loss"][0][1] == pytest.approx(sum(steps[s]["loss"] for s in range(1, 6)) / 5)
    _assert_holds(_wandb_history(runs / f"{backend}-1"), expected)


def test_a_resumed_run_reports_each_step_once(tmp_path):
    """The run stopped after its step-5 checkpoint (its event file has steps past it) and resumed: the
    event files are written anew from metrics.jsonl, so each step is there once, as in metrics.jsonl."""
    settings = [*SETTINGS, "train.save_every=5", "train.report_to=[tensorboard]"]
    out = tmp_path / "run"
    train(load_recipe(DEMO, settings), "torch", out, progress=False)
    train(load_recipe(DEMO, settings), "torch", out, progress=False, resume=out / "checkpoints" / "step-00000010")
    board, lines = read_tensorboard(out / "tensorboard"), _metrics(out)
    assert [step for step, _ in board["train/loss"]] == list(range(1, 13))
    assert board["train/loss"] == [(line["step"], pytest.approx(line["loss"], rel=1e-6)) for line in lines
                                   if "loss" in line]


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """The W&B run's id is kept in the checkpoint: the resumed process writes to the same run, from
    the steps after the checkpoint (11-12: one window, at step 12)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = [*SETTINGS, "train.save_every=5", "train.report_to=[wandb]"]
    out = tmp_path / "run"
    train(load_recipe(DEMO, settings), "torch", out, progress=False)
    first = glob.glob(str(out / "wandb" / "offline-run-*"))
    train(load_recipe(DEMO, settings), "torch", out, progress=False, resume=out / "checkpoints" / "step-00000010")
    (second,) = set(glob.glob(str(out / "wandb" / "offline-run-*"))) - set(first)
    ids = [Path(path).name for run in (*first, second) for path in glob.glob(str(Path(run) / "run-*.wandb"))]
    assert len(first) == 1 and len(ids) == 2 and ids[0] == ids[1]  # run-ID.wandb: the same run
    steps = {line["step"]: line for line in _metrics(out) if "loss" in line}
    resumed = _wandb_history_of(second)
    assert resumed["train/loss"] == [(12, pytest.approx((steps[11]["loss"] + steps[12]["loss"]) / 2))]


def test_the_console_prints_a_line_every_log_every_steps(tmp_path, capsys):
    train(load_recipe(DEMO, SETTINGS), "torch", tmp_path / "run", progress=True)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in printed] == ["step 5/12", "step 10/12"]
    assert all(" tokens/s, peak " in line and line.endswith(" MB") for line in printed)
    lines = _metrics(tmp_path / "run")
    mean = sum(line["loss"] for line in lines[:5]) / 5  # the loss over the steps since the last line
    assert printed[0].startswith(f"step 5/12: loss {mean:.4f}, lr {lines[4]['lr']:.2e}, ")


@pytest.mark.parametrize("reporter, library", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_a_missing_reporter_library_is_one_sentence(reporter, library, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, library, None)  # import fails as if it were not installed
    with pytest.raises(TwintuneError, match=rf"names {reporter}, whose .* is not installed: pip install "
                                            r"'twintune\[report\]'"):
        train(load_recipe(DEMO, [*SETTINGS, f"train.report_to=[{reporter}]"]), "torch", tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before the first step


def test_report_to_and_log_every_are_checked():
    with pytest.raises(TwintuneError, match="names 'tensorbord', which is no reporter; did you mean 'tensorboard'"):
        load_recipe(DEMO, ["train.report_to=[tensorbord]"])
    with pytest.raises(TwintuneError, match="names a reporter twice"):
        load_recipe(DEMO, ["train.report_to=[wandb, wandb]"])
    with pytest.raises(TwintuneError, match="'train.log_every' must be >= 0"):
        load_recipe(DEMO, ["train.log_every=-1"])
