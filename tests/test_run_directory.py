"""A run directory is never overwritten by accident (issue 28): `train --out` into a directory that
holds a run is refused with every file untouched; `--overwrite` replaces it, and an overwrite
killed midway leaves the new run's files or the old run's, never a mix of the two."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twintune.cli import main

DEMO = str(Path(__file__).resolve().parent.parent / "recipes" / "demo-financial-sentiment.yaml")
SHORT = ["--backend", "torch", "--no-progress", "--set", "train.max_steps=2", "--set", "train.save_every=1"]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", DEMO, "--out", str(out), *SHORT]) == 0
    return out


def test_a_new_run_into_a_finished_one_is_refused_and_touches_nothing(finished, capsys):
    before = _files(finished)
    assert main(["train", DEMO, "--out", str(finished), *SHORT, "--set", "method={name: bitfit}"]) == 2
    error = capsys.readouterr().err
    assert f"{finished} already holds a run" in error and f"--resume {finished}" in error and "--overwrite" in error
    assert _files(finished) == before
    assert sorted(p.name for p in finished.parent.iterdir()) == ["run"]


def test_a_refused_run_leaves_no_directory_behind(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["train", DEMO, "--out", str(out), *SHORT, "--set", "train.lr=-1"]) == 2
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_the_run_whole(tmp_path):
    out = tmp_path / "run"
    assert main(["train", DEMO, "--out", str(out), *SHORT, "--set", "train.max_steps=3"]) == 0
    assert (out / "checkpoints" / "step-00000003").is_dir()
    assert main(["train", DEMO, "--out", str(out), *SHORT, "--set", "method={name: bitfit}", "--overwrite"]) == 0
    assert json.loads((out / "recipe.json").read_text())["method"]["name"] == "bitfit"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert json.loads((out / "summary.json").read_text())["method"] == "bitfit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old run, moved aside, is gone


def test_an_overwrite_killed_midway_leaves_no_mix_of_two_runs(tmp_path):
    out = tmp_path / "run"
    subprocess_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert main(["train", DEMO, "--out", str(out), *SHORT]) == 0
    old = _files(out)
    process = subprocess.Popen([sys.executable, "-m", "twintune", "train", DEMO, "--out", str(out), "--backend",
                                "torch", "--no-progress", "--set", "train.max_steps=300", "--set", "train.save_every=1",
                                "--set", "method={name: bitfit}", "--overwrite"], env=subprocess_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        def started() -> bool:  # the old run moved aside and the new one's first checkpoint written
            return len(list(tmp_path.iterdir())) == 2 and (out / "checkpoints").is_dir()

        while not started() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert started(), "the overwriting run wrote no checkpoint in time"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    aside = [p for p in tmp_path.iterdir() if p.name != "run"]
    assert len(aside) == 1 and _files(aside[0]) == old  # the old run, whole, where the rename put it
    new = _files(out)
    assert json.loads(new["recipe.json"])["method"]["name"] == "bitfit"
    assert "summary.json" not in new and not any(name.startswith("adapter/") for name in new)
    assert all(new[name] != old[name] for name in set(new) & set(old))  # every file is the new run's


# ---- a run keeps its backend -----------------------------------------------------------------------

def test_a_run_reopens_on_the_backend_that_trained_it(tmp_path, monkeypatch):
    from twintune import api
    from twintune.errors import TwintuneWarning
    from twintune.train import runs

    out = tmp_path / "mlx-run"
    assert main(["train", DEMO, "--out", str(out), "--backend", "mlx", "--no-progress", "--set",
                 "train.max_steps=2"]) == 0
    assert runs.evaluate_target(out, "test")["backend"] == "mlx"
    assert runs.evaluate_target(out, "test", "torch")["backend"] == "torch"  # unless told otherwise
    assert api.load(None, adapter=out).backend.name == "mlx"
    assert api.load(None, adapter=out, backend="torch").backend.name == "torch"

    def absent(name):  # as on a machine without MLX
        from twintune.errors import TwintuneError
        raise TwintuneError(f"the {name} backend needs the package 'mlx'; pip install 'twintune[mlx]'.")

    monkeypatch.setattr(runs, "backend_class", absent)
    with pytest.warns(TwintuneWarning, match=r"was trained on mlx, which cannot run here \(the mlx backend needs the "
                                             r"package 'mlx'"):
        assert runs.evaluate_target(out, "test")["backend"] == "torch"
