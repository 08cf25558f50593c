"""A run stopped by SIGTERM (a spot instance's, Slurm's, Kubernetes' notice) or SIGINT finishes its
step, writes a checkpoint at it, says where it is and how to resume, and exits 143 / 130; the
command it names, `--resume DIR` alone, ends where an uninterrupted run ends (issue 28). On one
process per backend, and on two (torchrun, mlx.launch), where every process stops at the same step."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "recipes" / "demo-financial-sentiment.yaml")
STEPS = 60
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GLOO_SOCKET_IFNAME": "lo"}


def _train(args: list[str], cwd: Path, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "twintune", "train", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **options)


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)
    except OSError:
        return 0


def _interrupted(args: list[str], cwd: Path, out: Path, signum: int, at_step: int) -> tuple[int, str]:
    """Start a run, signal it once its metrics show `at_step` steps, and return its exit code and stderr."""
    process = _train([*args, "--out", str(out)], cwd)
    deadline = time.monotonic() + 240
    while _lines(out / "metrics.jsonl") < at_step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=240)
    return process.returncode, stderr


def _result(out: Path) -> tuple[list[float], bytes]:
    summary = json.loads((out / "summary.json").read_text())
    return summary["train_losses"], (out / "adapter" / "adapter_model.safetensors").read_bytes()


CASES = [("torch", 1, signal.SIGTERM), ("mlx", 1, signal.SIGTERM), ("torch", 1, signal.SIGINT),
         ("torch", 2, signal.SIGTERM), ("mlx", 2, signal.SIGTERM)]


@pytest.mark.parametrize("backend, processes, signum", CASES,
                         ids=[f"{b}-{n}-{signal.Signals(s).name}" for b, n, s in CASES])
def test_a_stopped_run_checkpoints_its_step_and_resumes_with_the_command_it_names(tmp_path, backend, processes, signum):
    args = [DEMO, "--backend", backend, "--no-progress", "--set", f"train.max_steps={STEPS}"]
    args += ["--nproc", str(processes)] if processes > 1 else []
    whole = _train([*args, "--out", str(tmp_path / "whole")], tmp_path)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    at_step = random.Random(f"{backend}{processes}{signum}").randint(3, STEPS // 2)
    code, stderr = _interrupted(args, tmp_path, tmp_path / "stopped", signum, at_step)
    assert code == 128 + signum, stderr
    said = [line for line in stderr.splitlines() if line.startswith("twintune: ")]
    assert len(said) == 1 and "Traceback" not in stderr, stderr
    found = re.fullmatch(r"twintune: stopped by (SIG\w+) after step (\d+); the checkpoint (\S+) holds it; "
                         r"resume with: (.+)", said[0])
    assert found and found[1] == signal.Signals(signum).name, said[0]
    step = int(found[2])
    assert at_step <= step < STEPS
    checkpoint = tmp_path / found[3]
    assert checkpoint.name == f"step-{step:08d}" and (checkpoint / "state.json").is_file()
    assert _lines(tmp_path / "stopped" / "metrics.jsonl") == step  # every process stopped at this step

    command = shlex.split(found[4])
    assert command[:4] == ["twintune", "train", "--resume", str(tmp_path / "stopped")]
    resumed = subprocess.run([sys.executable, "-m", "twintune", *command[1:], "--no-progress"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _result(tmp_path / "stopped") == _result(tmp_path / "whole")


def test_a_stopped_run_is_continued_not_evaluated_and_resume_alone_refuses_a_change(tmp_path):
    out = tmp_path / "run"
    code, _ = _interrupted([DEMO, "--backend", "torch", "--no-progress", "--set", f"train.max_steps={STEPS}"],
                           tmp_path, out, signal.SIGTERM, 3)
    assert code == 143
    for verb in (["eval", str(out)], ["predict", str(out), "Sales rose ."], ["generate", str(out), "Sales"]):
        refused = subprocess.run([sys.executable, "-m", "twintune", *verb], cwd=tmp_path, env=ENV, capture_output=True,
                                 text=True, timeout=300)
        assert refused.returncode == 2 and (f"{out} has no adapter yet: the run stopped before it finished (its newest "
                                            "checkpoint is step-") in refused.stderr, refused.stderr
        assert f"continue it with twintune train --resume {out}." in refused.stderr
    changed = subprocess.run([sys.executable, "-m", "twintune", "train", "--resume", str(out), "--set", "train.lr=1e-3"],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "the recipe differs from the one it was trained with (train.lr)" in changed.stderr
    nothing = subprocess.run([sys.executable, "-m", "twintune", "train"], cwd=tmp_path, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert nothing.returncode == 2 and "give a recipe to train (or --resume DIR alone" in nothing.stderr
