"""Training checkpoints: adapter + optimizer state + step + history, written atomically, verified on load.

A checkpoint is a directory RUN/checkpoints/step-00000050/ holding

    trainable.safetensors   the trainable values (LoRA A/B), twintune names
    optimizer.safetensors   the optimizer's state per value (AdamW's m and v; 8-bit codes as uint8), and its step
    best.safetensors        with early stopping: the values at the best evaluation so far
    rollout.safetensors     PPO: the current rollout's rows (train/rollouts.py)
    state.json              format, step, the recipe, the history so far (every step's record,
                            evaluations, tokens, seconds) and the sha256 of both files

It is written into a temporary directory that is renamed into place, so a run killed at any
moment leaves either a whole checkpoint or none. The data position is the step itself (the
training order is addressed by step) and dropout masks are a pure function of (seed, step,
micro-batch) (twintune/dropout.py), so nothing more is needed to continue exactly where the run
stopped, on either backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.formats.safetensors_io import read_safetensors, write_safetensors

FORMAT = 1
FILES = ("trainable.safetensors", "optimizer.safetensors")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
                    recipe: dict, history: dict, keep_last: int, best: dict[str, np.ndarray] | None = None,
                    rollout: dict[str, np.ndarray] | None = None) -> Path:
    """Write one checkpoint atomically and keep only the newest `keep_last`.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch")
        >>> save_checkpoint(Path("runs/checkpointed"), 50, run.backend.trainable_state(), run.backend.optimizer_state(),
        ...                 run.recipe.to_dict(), {"log": []}, 2).name
        'step-00000050'
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "trainable.safetensors", trainable)
    write_safetensors(tmp / "optimizer.safetensors", optimizer)
    files = list(FILES)
    if best is not None:  # early stopping: the best evaluation's values so far
        write_safetensors(tmp / "best.safetensors", best)
        files.append("best.safetensors")
    if rollout:  # PPO: the rollout the next steps train on, which its sampling model can no longer make
        write_safetensors(tmp / "rollout.safetensors", rollout)
        files.append("rollout.safetensors")
    state = {"format": FORMAT, "step": step, "recipe": recipe, "history": history,
             "sha256": {name: _sha256(tmp / name) for name in files}}
    (tmp / "state.json").write_text(json.dumps(state))
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary ones are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    if not path.exists():
        raise TwintuneError(f"cannot resume: {path} does not exist.")
    found = list_checkpoints(path)
    if not found:
        raise TwintuneError(f"cannot resume: {path} holds no checkpoint (set train.save_every to write them).")
    return found[-1]


def load_checkpoint_state(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray], dict | None, dict]:
    """(state, trainable, optimizer, best or None, rollout or {}) of a checkpoint, after checking every
    file is whole."""
    earlier = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    advice = f" An earlier checkpoint is {earlier[-1]}; resume from it." if earlier else ""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TwintuneError(f"checkpoint {path} is corrupt: state.json cannot be read ({e}).{advice}") from None
    if state.get("format") != FORMAT:
        raise TwintuneError(f"checkpoint {path} has format {state.get('format')!r}; this twintune reads format {FORMAT}.")
    for name in sorted(set(FILES) | set(state.get("sha256", {}))):
        if not (path / name).exists():
            raise TwintuneError(f"checkpoint {path} is incomplete: {name} is missing.{advice}")
        if _sha256(path / name) != state.get("sha256", {}).get(name):
            raise TwintuneError(f"checkpoint {path} is corrupt: {name} does not match its checksum "
                                f"(truncated or changed).{advice}")
    best = read_safetensors(path / "best.safetensors") if "best.safetensors" in state["sha256"] else None
    rollout = read_safetensors(path / "rollout.safetensors") if "rollout.safetensors" in state["sha256"] else {}
    return (state, read_safetensors(path / "trainable.safetensors"), read_safetensors(path / "optimizer.safetensors"),
            best, rollout)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
