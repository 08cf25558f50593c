"""The training loop: resume, the steps, evaluations at their cadence, early stopping, checkpoints and
the run's files. It reads like nanoGPT's; the work is in the rooms beside it: train/build.py (a recipe
becomes a run), train/step.py (one optimizer step), train/evaluate.py (a task's report).

Everything here is numpy and plain Python.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from twintune.backends import resolve_backend_name
from twintune.errors import TwintuneError
from twintune.formats.adapter import save_adapter
from twintune.machine import peak_rss_mb
from twintune.memory import check_memory_limit
from twintune.formats.safetensors_io import write_json
from twintune.recipe import Recipe, apply_override, check_trains_something, load_recipe, recipe_from_dict
from twintune.tasks import Report
from twintune.train.build import Run, backend_cannot_run, prepare
from twintune.train.checkpoints import checkpoint_dir, find_checkpoint, load_checkpoint_state, save_checkpoint
from twintune.train.distributed import check_world, launched_world
from twintune.train.evaluate import better, evaluate, perplexity_of
from twintune.train.features import train_features
from twintune.train.guards import forgetting_summary
from twintune.train.interrupt import Interrupted, StopRequests, stopped
from twintune.train.loss_scale import LossScaler
from twintune.train.plots import plot_run
from twintune.train.reporting import Reporters, Watch, require
from twintune.train.step import train_step


@dataclass
class TrainingState:
    """What a run has done so far. A checkpoint keeps it (`to_dict`, state.json's "history") and a
    resumed run goes on from it, so its files end as an uninterrupted run's."""

    log: list[dict] = field(default_factory=list)  # metrics.jsonl's lines: every step's record, every evaluation
    real_tokens: int = 0  # non-padding tokens trained on
    train_seconds: float = 0.0  # in steps, evaluations and checkpoints
    best: dict | None = None  # early stopping's best evaluation: {"step", "value"}
    backends: list[dict] = field(default_factory=list)  # segments: {"backend", "first_step", "last_step", "processes"}
    stopped_early: bool = False
    loss_scale: dict | None = None  # float16's LossScaler, as of the last checkpoint
    forgetting_before: float | None = None  # train.forgetting_eval's perplexity before the first step
    wandb_id: str | None = None  # the W&B run a resumed run continues (train.report_to: wandb)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainingState":
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if v is not None or k == "best"}

    @property
    def last_step(self) -> int:
        return self.backends[-1]["last_step"]


class MetricsLog:
    """metrics.jsonl, rewritten from the state's lines first (lines a killed run wrote after its last
    checkpoint do not appear twice); each new line goes to the state, the file (os.devnull off rank 0)
    and the run's reporters (train/reporting.py)."""

    def __init__(self, path: Path | None, state: TrainingState, reporters: Reporters):
        self.state, self.file, self.reporters = state, open(path or os.devnull, "w"), reporters
        for line in state.log:
            self.file.write(json.dumps(line) + "\n")

    def write(self, line: dict) -> None:
        self.state.log.append(line)
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        self.reporters.line(line)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        self.reporters.close()


def recipe_to_train(path: str | None, overrides: list[str], resume: str | None) -> Recipe:
    """The recipe `twintune train` runs: the file given, with its --set values; or, with --resume alone,
    the recipe the run was trained with (its newest checkpoint's), so a resume needs none of the first
    command's --set values again (any given that change it are refused by name when it resumes)."""
    if path is not None:
        return load_recipe(path, overrides)
    if resume is None:
        raise TwintuneError("give a recipe to train (or --resume DIR alone to continue a run).")
    checkpoint = find_checkpoint(resume)
    try:
        raw = json.loads((checkpoint / "state.json").read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TwintuneError(f"checkpoint {checkpoint} is corrupt: its state.json cannot be read ({error}); resume from "
                            "an earlier checkpoint or give the recipe.") from None
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def default_out_dir(recipe: Recipe, backend: str) -> Path:
    return Path("runs") / f"{recipe.name}-{backend}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(recipe: Recipe, backend: str | None = None, out_dir: str | Path | None = None,
          progress: bool = True, resume: str | Path | None = None, overwrite: bool = False) -> dict:
    """Train a recipe on a backend; write the adapter, metrics.jsonl, a plot and summary.json to out_dir.

    With `resume` (a run directory or one of its checkpoints) training continues from the
    checkpoint and ends with the same adapter and loss log as a run that was never stopped. An
    out_dir that holds another run is refused unless `overwrite` replaces it (the old run is moved
    aside first and removed when the new one is written: never a mix of two runs).

    Example:
        >>> from twintune.recipe import load_recipe
        >>> recipe = load_recipe("recipes/demo-financial-sentiment.yaml", ["train.max_steps=4"])
        >>> summary = train(recipe, backend="torch", out_dir="runs/loop-demo", progress=False)
        >>> summary["steps"], summary["out_dir"]
        (4, 'runs/loop-demo')
    """
    check_trains_something(recipe)
    name = resolve_backend_name(backend or recipe.backend)
    checkpoint = _checkpoint_to_resume(resume, recipe, name) if resume is not None else None
    out = Path(out_dir) if out_dir else checkpoint[0].parent.parent if checkpoint else default_out_dir(recipe, name)
    world = launched_world()
    check_world(world, name, recipe)
    _check_before_loading(recipe, name, world)
    resuming_here = checkpoint is not None and checkpoint[0].parent.parent.resolve() == out.resolve()
    replaced = _claim_out(out, resuming_here, overwrite, world.writes)
    run = prepare(recipe, name, world=world)
    if not recipe.task.trains_in_steps:
        return _finished(_train_features(run, out), replaced)
    state, first_step, best_values = _start(run, name, checkpoint)
    if world.writes:
        write_json(out / "recipe.json", recipe.to_dict())
    if recipe.train.forgetting_eval and state.forgetting_before is None:  # measured once, before the first step
        state.forgetting_before = perplexity_of(run, run.general)
    bar = _progress(run.total_steps, progress and world.writes, first_step)
    with MetricsLog(out / "metrics.jsonl" if world.writes else None, state, _reporters(run, out, state)) as log, \
            StopRequests() as stops:
        watch = Watch(recipe.train.log_every, run.total_steps, log.reporters, lambda: _peak_mb(run), bar and bar.write)
        best_values = _train_steps(run, state, log, out, first_step, best_values, bar, stops, watch)
        if stops.signum:
            raise _stopped(run, stops.signum, state.last_step, out, bar)
        if best_values is not None:  # early stopping: the best evaluation's adapter is the result
            run.backend.set_trainable_state(best_values)
        report = evaluate(run)
        log.write({"step": state.best["step"] if best_values is not None else state.last_step,
                   **report.logged()})
    if bar:
        bar.close()
    trained = run.backend.trainable_state()  # on every process: a sharded model gathers its shards
    if world.writes:  # the same model on every process; rank 0 saves it
        save_adapter(out / "adapter", run.method, trained, recipe.model, run.model_dir,
                     labels=recipe.task.head_labels(recipe), spec=run.spec)
        summary = _summary(run, state, report, first_step, trained, out)
        write_json(out / "summary.json", summary)
        plot_run(out / "training.png", summary["train_losses"], summary["evals"], title=f"{recipe.name} ({name})",
                 metrics=recipe.task.metrics)
    else:
        summary = {"backend": name, "rank": world.rank, "world_size": world.size, "out_dir": str(out)}
    if world.size > 1:  # the processes end together: none closes its connections while another still works
        run.backend.leave()
    return _finished(summary, replaced)


def _check_before_loading(recipe: Recipe, backend: str, world) -> None:
    """What can refuse a run before its model loads: a reporter's missing library, the memory limit."""
    if world.writes:
        require(recipe.train.report_to)
    check_memory_limit(recipe, backend)


def _reporters(run: Run, out: Path, state: TrainingState) -> Reporters:
    """The run's reporters (rank 0's; none elsewhere), given the lines so far (a resumed run's)."""
    reporters = Reporters(run.recipe.train.report_to if run.world.writes else [], out, run.recipe.to_dict(),
                          state.wandb_id, replay=state.log, every=run.recipe.train.log_every)
    state.wandb_id = reporters.wandb_id
    return reporters


def _start(run: Run, backend: str, checkpoint: tuple | None) -> tuple[TrainingState, int, dict | None]:
    """The state to go on from (a checkpoint's, with its values and optimizer state restored, or a new
    one), the first step to run, and early stopping's best values so far; a segment for this backend."""
    state, first_step, best_values = TrainingState(), 0, None
    if checkpoint:
        saved, trainable, optimizer, best_values, rollout = checkpoint[1]
        run.backend.set_trainable_state(trainable)
        run.backend.set_optimizer_state(optimizer)
        if run.rollouts is not None:
            run.rollouts.load(rollout)
        state, first_step = TrainingState.from_dict(saved["history"]), saved["step"]
        if run.loss_scaler:
            run.loss_scaler = LossScaler(**state.loss_scale)
    # Which backend ran which steps: a resumed run adds a segment, on whichever backend it runs.
    state.backends.append({"backend": backend, "first_step": first_step + 1, "last_step": first_step,
                           "processes": run.world.size})
    return state, first_step, best_values


def _train_steps(run: Run, state: TrainingState, log: MetricsLog, out: Path, first_step: int,
                 best_values: dict | None, bar, stops: StopRequests, watch: Watch) -> dict | None:
    """The steps from first_step on, each logged (and watched: a console line and timings every
    train.log_every); evaluations every train.eval_every steps (and early stopping); checkpoints every
    train.save_every, and at the step a stop was asked for (SIGTERM, SIGINT: `stops.signum` then says
    which). Returns early stopping's best values (or None)."""
    t = run.recipe.train
    started = time.perf_counter()
    for step in range(first_step, first_step if state.stopped_early else run.total_steps):
        try:
            record = train_step(run, step)
        except TwintuneError as error:  # a NaN loss or gradient: its sentence stays in metrics.jsonl (twintune doctor)
            log.write({"step": step + 1, "error": str(error)})
            raise
        state.backends[-1]["last_step"] = step + 1
        state.real_tokens += record["tokens"]
        log.write(record)
        watch.step(record)
        if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < run.total_steps:
            best_values = _evaluate_and_maybe_stop(run, state, log, step + 1, best_values)
        stop = stops.agree(run.backend, run.world)
        saves = t.save_every and ((step + 1) % t.save_every == 0 or step + 1 == run.total_steps or state.stopped_early)
        if (saves or stop) and (run.world.writes or run.backend.sharded):  # sharded: every process gathers its shards
            state.train_seconds += time.perf_counter() - started
            started = time.perf_counter()
            _save_checkpoint(run, state, out, step + 1, best_values)
        if bar:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            bar.update(1)
        if state.stopped_early or stop:
            break
    state.train_seconds += time.perf_counter() - started
    return best_values


def _stopped(run: Run, signum: int, step: int, out: Path, bar) -> Interrupted:
    """A run stopped by a signal, its checkpoint written: the processes end together, and rank 0 says
    where the checkpoint is and how to resume (the others stop silently)."""
    if bar:
        bar.close()
    if run.world.size > 1:
        run.backend.leave()
    command = f"twintune train --resume {out} --backend {run.backend.name}"
    command += f" --nproc {run.world.size}" if run.world.size > 1 else ""
    return stopped(signum, step, checkpoint_dir(out, step), command, quiet=not run.world.writes)


def _evaluate_and_maybe_stop(run: Run, state: TrainingState, log: MetricsLog, step: int,
                             best_values: dict | None) -> dict | None:
    """An evaluation logged at `step`; with early stopping, the best values kept and the stop decided."""
    t = run.recipe.train
    log.write({"step": step, **evaluate(run).logged()})
    if not t.early_stopping_patience:
        return best_values
    value = state.log[-1][t.early_stopping_metric]
    if state.best is None or better(t.early_stopping_metric, value, state.best["value"]):
        state.best = {"step": step, "value": value}
        best_values = run.backend.trainable_state()
    evals_since_best = (step - state.best["step"]) // t.eval_every
    state.stopped_early = evals_since_best >= t.early_stopping_patience
    return best_values


def _save_checkpoint(run: Run, state: TrainingState, out: Path, step: int, best_values: dict | None) -> None:
    if run.loss_scaler:
        state.loss_scale = run.loss_scaler.state()
    trainable, optimizer = run.backend.trainable_state(), run.backend.optimizer_state()
    if run.world.writes:
        save_checkpoint(out, step, trainable, optimizer, run.recipe.to_dict(), state.to_dict(),
                        run.recipe.train.keep_last, best_values, run.rollouts.state() if run.rollouts else None)


def _summary(run: Run, state: TrainingState, report: Report, first_step: int, trained: dict, out: Path) -> dict:
    """summary.json: what the run was, what it reached, and what it cost."""
    recipe, t = run.recipe, run.recipe.train
    losses = [line["loss"] for line in state.log if "loss" in line]
    seconds = state.train_seconds
    return {
        "backend": run.backend.name,
        "method": run.method.name,
        "task": recipe.task.to_dict(),
        "model": recipe.model,
        "recipe": recipe.name,
        "seed": recipe.seed,
        "steps": len(losses),
        "planned_steps": run.total_steps,
        "stopped_early": state.stopped_early,
        "best": state.best,
        "resumed_from_step": first_step or None,
        "backend_steps": [s for s in state.backends if s["last_step"] >= s["first_step"]],
        "trainable_params": int(sum(v.size for v in trained.values())),
        "final_train_loss": losses[-1],
        "train_losses": losses,
        **report.logged(),
        **report.summary_fields(),
        "evals": [line for line in state.log if set(line) & set(recipe.task.metrics)],
        **({"forgetting": forgetting_summary(t.forgetting_eval, state.forgetting_before,
                                             perplexity_of(run, run.general))} if t.forgetting_eval else {}),
        "train_seconds": seconds,
        "real_tokens_per_second": state.real_tokens / seconds if seconds > 0 else 0.0,
        "peak_memory_mb": peak_rss_mb(),  # the process's peak RSS, on every backend
        "framework_peak_memory_mb": run.backend.framework_peak_mb(),  # MLX's or CUDA's allocator peak, else None
        "world_size": run.world.size,
        "engine": run.world.launcher,  # the launcher (summary key kept for older readers)
        "fsdp": run.backend.sharded,
        "out_dir": str(out),
    }


def _train_features(run: Run, out: Path) -> dict:
    """The features task's run directory: recipe.json, classifier/, summary.json (train/features.py)."""
    write_json(out / "recipe.json", run.recipe.to_dict())
    result = train_features(run, out)
    summary = {"backend": run.backend.name, "method": run.method.name, "task": run.recipe.task.to_dict(),
               "model": run.recipe.model, "recipe": run.recipe.name, "seed": run.recipe.seed, "steps": 0, **result,
               "peak_memory_mb": peak_rss_mb(), "framework_peak_memory_mb": run.backend.framework_peak_mb(),
               "out_dir": str(out)}
    write_json(out / "summary.json", summary)
    return summary


def _checkpoint_to_resume(resume: str | Path, recipe: Recipe, backend: str) -> tuple[Path, tuple]:
    """The checkpoint `resume` names and what it holds, checked against the recipe and the backend."""
    if not recipe.task.trains_in_steps:
        raise TwintuneError(f"a {recipe.task.name} run has no checkpoints to resume (its features are cached: train it "
                            "again).")
    found = find_checkpoint(resume)
    held = load_checkpoint_state(found)
    _check_same_recipe(held[0]["recipe"], recipe.to_dict(), found)
    _check_backend_can_resume(recipe, backend, held[0]["history"], found)
    return found, held


def _check_backend_can_resume(recipe: Recipe, backend: str, history: dict, checkpoint: Path) -> None:
    """A checkpoint resumes on either backend (the same numbers, the same files), unless the
    recipe needs what only its own backend has (MLX's affine quantization, an mlx-lm model)."""
    problem = backend_cannot_run(recipe, backend)
    if problem:
        trained_on = (history.get("backends") or [{"backend": "another backend"}])[-1]["backend"]
        raise TwintuneError(f"cannot resume {checkpoint} on {backend}: it was trained on {trained_on} and {problem}.")


# Keys that say how the processes hold the model, not what is trained: a sharded run's checkpoint
# resumes on one process, or on MLX, which has no sharding.
HOW_NOT_WHAT = {"train.fsdp", "train.report_to", "train.log_every"}


def _check_same_recipe(saved: dict, current: dict, checkpoint: Path) -> None:
    """A resumed run must be the same run: only the progress bar (and HOW_NOT_WHAT) may differ. The
    saved recipe is read again first, so keys added since it was written (at their defaults) are no
    difference."""
    saved = recipe_from_dict(saved).to_dict()
    differences = [key for key in sorted(set(_flatten(saved)) | set(_flatten(current)))
                   if _flatten(saved).get(key) != _flatten(current).get(key) and key not in HOW_NOT_WHAT]
    if "train.optimizer.name" in differences:
        was, now = _flatten(saved)["train.optimizer.name"], _flatten(current)["train.optimizer.name"]
        raise TwintuneError(f"cannot resume from {checkpoint}: it was trained with optimizer {was} and the recipe asks "
                            f"for {now}, whose state is another; resume with --set train.optimizer.name={was}, or "
                            "start a new run.")
    if differences:
        raise TwintuneError(f"cannot resume from {checkpoint}: the recipe differs from the one it was trained with "
                            f"({', '.join(differences[:5])}); resume with the same recipe and --set values.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "labels":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# What makes a directory a run's: a new run into it is refused unless it resumes it or overwrites it
RUN_FILES = ("recipe.json", "summary.json", "metrics.jsonl", "checkpoints", "adapter", "classifier")


def _claim_out(out: Path, resuming_here: bool, overwrite: bool, writes: bool) -> Path | None:
    """The run directory checked before any slow work: one holding another run is refused, naming
    --resume and --overwrite, with nothing touched; with `overwrite` the old run moves aside
    (returned, to be removed once the new run is written). Every process checks, the writer moves."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    replaced = None
    if held and not resuming_here:
        if not overwrite:
            raise TwintuneError(f"{out} already holds a run ({', '.join(held)}); continue it with --resume {out}, "
                                "replace it with --overwrite, or choose another --out (nothing was touched).")
        if writes:
            replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(replaced)  # one rename: out holds the old run or, from here on, only the new one's files
    if writes:
        _check_writable(out)
    return replaced


def _finished(summary: dict, replaced: Path | None) -> dict:
    """The new run is written: the run it replaced goes."""
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return summary


def _check_writable(out: Path) -> None:
    """The run directory can be made and written (checked without making it: a refused run leaves nothing)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TwintuneError(f"output directory {out} is not writable ({existing} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TwintuneError(f"output directory {out} is not writable (permission denied on {existing}).")


def _peak_mb(run: Run) -> float:
    """The peak memory so far: the framework allocator's (MLX, CUDA), else the process's peak RSS."""
    return run.backend.framework_peak_mb() or peak_rss_mb()


def _progress(total: int, enabled: bool, done: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)
