"""`twintune doctor RUN`: what went wrong in a run, in plain sentences, each with its evidence (the
steps and numbers) and the `--set` values to try; or that the run is healthy.

It reads the run directory only: metrics.jsonl (every step's loss, learning rate and gradient norm,
every evaluation, the sentence a failed run ended with), recipe.json, summary.json where the run
finished, and the adapter's LoRA B matrices where it has them. No model is loaded, so a
10,000-step run is read in a fraction of a second.

The checks run in order, and a finding that explains others silences them: a run that failed or
diverged is not also "too low a learning rate"; an adapter that never moved is not also a
classifier stuck on one class. Their thresholds are written beside them.

Everything here is numpy and plain Python.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.tasks import TASKS, Task
from twintune.train.reporting import is_step

LOWER_IS_BETTER = ("val_loss", "val_perplexity")
MEASURES = {"reward": "the mean reward", "objective/scores": "the mean score (objective/scores)"}


@dataclass(frozen=True)
class Finding:
    """One thing that went wrong: `kind` (a stable name for scripts), a sentence, its evidence, and
    `--set` values to try (none where the cause lies outside the recipe)."""

    kind: str
    sentence: str
    evidence: str
    try_set: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "sentence": self.sentence, "evidence": self.evidence, "try": list(self.try_set)}

    def text(self) -> str:
        tries = " ".join(f"--set {value}" for value in self.try_set)
        return f"{self.sentence}\n   evidence: {self.evidence}" + (f"\n   try: {tries}" if tries else "")


@dataclass
class RunLog:
    """What doctor reads of a run directory."""

    path: Path
    recipe: dict
    steps: list[dict]  # metrics.jsonl's step records (loss, lr, grad_norm, ...)
    evals: list[dict]  # its evaluations (val_...)
    error: str | None = None  # the sentence a failed run ended with
    summary: dict | None = None  # None: the run did not finish
    lora_b_max: float | None = None  # the largest |value| of the adapter's LoRA B matrices; None: none
    losses: np.ndarray = field(init=False)  # what should fall: the loss, or the reward negated

    def __post_init__(self):
        key = self.reward_key or "loss"
        self.losses = np.array([step.get(key, np.nan) for step in self.steps], np.float64)
        if self.reward_key:
            self.losses = -self.losses

    @property
    def task(self) -> type[Task]:
        """The run's task class (what it says of itself: tasks/task.py)."""
        return TASKS.get(self.recipe.get("task", {}).get("name", ""), Task)

    @property
    def reward_key(self) -> str | None:
        """The step figure a sampling task's course is judged by (GRPO's reward, PPO's score: the mean
        reward of a step's completions, as TRL logs it); None: the loss."""
        return self.task.progress

    @property
    def measure(self) -> str:
        if not self.reward_key:
            return "the training loss"
        return MEASURES.get(self.reward_key, f"the mean {self.reward_key}")

    def shown(self, value: float) -> str:
        """A value of `losses` as the run logged it (a reward with its own sign)."""
        return _fmt(-value if self.reward_key else value)

    def noise(self) -> float:
        """The scatter of a window's mean: the per-step values' standard deviation / sqrt(window)."""
        return float(np.std(self.losses)) / math.sqrt(self.window())

    def fall_t(self) -> float:
        """How many standard errors the least-squares line through every step's value falls: a
        sampled reward scatters so much a step that the run's whole course must speak, not its ends."""
        steps = np.arange(len(self.losses), dtype=np.float64)
        slope, intercept = np.polyfit(steps, self.losses, 1)
        residuals = self.losses - (intercept + slope * steps)
        error = math.sqrt(residuals.var(ddof=2) / ((steps - steps.mean()) ** 2).sum())
        return -slope / error if error > 0 else (math.inf if slope < 0 else 0.0)

    @property
    def train(self) -> dict:
        return self.recipe.get("train", {})

    def window(self) -> int:
        """Steps averaged at each end of the run: a tenth of them, at least 3 (a step's loss is noisy)."""
        return max(3, len(self.steps) // 10)

    def first_and_last(self) -> tuple[float, float]:
        w = self.window()
        return float(self.losses[:w].mean()), float(self.losses[-w:].mean())


def read_run(path: str | Path) -> RunLog:
    """The run directory's metrics, recipe, summary and LoRA B, or a sentence saying what is missing.

    Example:
        >>> log = read_run("runs/demo")
        >>> len(log.steps), sorted(log.evals[-1])[:2]
        (4, ['step', 'val_accuracy'])
    """
    path = Path(path)
    if not (path / "metrics.jsonl").is_file() or not (path / "recipe.json").is_file():
        raise TwintuneError(f"{path} is not a run directory: it has no metrics.jsonl and recipe.json (give the "
                            "directory `twintune train --out` wrote).")
    lines = []
    text = (path / "metrics.jsonl").read_text().splitlines()
    for number, line in enumerate(text, 1):
        try:
            lines.append(json.loads(line))
        except ValueError:
            if number < len(text):  # a killed run's last line may be cut short; any other is damage
                raise TwintuneError(f"{path / 'metrics.jsonl'} line {number} is not JSON: the file is damaged.") from None
    recipe = json.loads((path / "recipe.json").read_text())
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    errors = [line["error"] for line in lines if "error" in line]
    return RunLog(path, recipe, steps=[line for line in lines if is_step(line)],
                  evals=[line for line in lines if any(key.startswith("val_") for key in line)],
                  error=errors[-1] if errors else None, summary=summary, lora_b_max=_lora_b_max(path / "adapter"))


def _lora_b_max(adapter: Path) -> float | None:
    """The largest |value| of the adapter's LoRA B matrices, read alone (a full model's file is large)."""
    files = sorted(adapter.glob("*.safetensors")) if adapter.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    largest = None
    for file in files:
        with safe_open(str(file), framework="numpy") as tensors:
            for name in tensors.keys():
                if "lora_B" in name:
                    value = float(np.abs(tensors.get_tensor(name)).max(initial=0.0))
                    largest = value if largest is None else max(largest, value)
    return largest


def _finite_median(values: np.ndarray) -> float:
    """The median of the logged values (a skipped float16 step has no gradient norm); inf: none."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.inf


def _lr(log: RunLog) -> float:
    from twintune.recipe import DEFAULT_LR

    return log.train.get("lr") or DEFAULT_LR


def _fmt(value: float) -> str:
    return f"{value:.4g}"


# ---- the checks, in order: each sees the kinds found before it --------------------------------

def failed(log: RunLog, found: set[str]) -> Finding | None:
    """The run stopped on a NaN or infinite loss or gradient (the loop's sentence is in metrics.jsonl)."""
    if log.error is None:
        return None
    recent = ", ".join(f"{_fmt(s['loss'])} (step {s['step']})" for s in log.steps[-3:]) or "no step finished"
    float16 = ("dtype=bfloat16",) if log.recipe.get("dtype") == "float16" else ()  # (its range ends at 65504)
    return Finding("failed", f"The run failed: {log.error}", f"the last losses logged: {recent}.",
                   (f"train.lr={_lr(log) / 10:g}",) + (("train.max_grad_norm=1.0",)
                                                        if not log.train.get("max_grad_norm", 1.0) else ()) + float16)


def diverged(log: RunLog, found: set[str]) -> Finding | None:
    """The loss fell, then rose back: the run's last tenth 1.5x its lowest stretch, and above it by
    a tenth of where it started. A reward (which may sit at or below 0): it rose, then gave back half
    of its gain, the gain and the loss each beyond twice a window's scatter."""
    if found or len(log.steps) < 20:
        return None
    w = log.window()
    smoothed = np.convolve(log.losses, np.ones(w) / w, mode="valid")
    low = int(smoothed.argmin())
    first, last = log.first_and_last()
    if log.reward_key:
        gain, lost, noise = first - smoothed[low], last - smoothed[low], 2 * log.noise()
        if not (gain > noise and lost > max(0.5 * gain, noise)):
            return None
    elif not (last > 1.5 * smoothed[low] and last - smoothed[low] > 0.1 * abs(first)):
        return None
    at = log.steps[low + w - 1]["step"]
    moved = "rose, then fell again" if log.reward_key else "fell, then rose again"
    return Finding("diverged", f"The run diverged: {log.measure} {moved}.",
                   f"its mean over {w} steps was {log.shown(smoothed[low])} at step {at} and {log.shown(last)} at the "
                   f"end (step {log.steps[-1]['step']}); it started at {log.shown(first)}.",
                   (f"train.lr={_lr(log) / 10:g}",))


def did_not_move(log: RunLog, found: set[str]) -> Finding | None:
    """No gradient reached the trained values: every step's gradient norm 0, or every LoRA B (which
    starts at 0) still under a thousandth of one step's size (an Adam step moves a value by about the
    learning rate, however small its gradient, down to ~1e-8 of it)."""
    norms = [s["grad_norm"] for s in log.steps if s.get("grad_norm") is not None]
    zero = bool(norms) and max(norms) == 0.0
    still = log.lora_b_max is not None and log.lora_b_max < 1e-3 * _lr(log)
    if found or not log.steps or not (zero or still):
        return None
    evidence = [f"the gradient norm was 0 at each of the {len(norms)} steps"] if zero else []
    if still:
        evidence.append(f"the adapter's LoRA B matrices (which start at 0) are at most {log.lora_b_max:.3g}, under a "
                        f"thousandth of one step of lr {_lr(log):g}")
    if any("reward_std" in s for s in log.steps):
        spread = max(s.get("reward_std", 0.0) for s in log.steps)
        evidence.append(f"reward_std, the spread of rewards within a prompt's group, was at most {_fmt(spread)}")
    return Finding("did_not_move", f"The adapter did not move: no gradient reached it, so training changed nothing; "
                                   f"{log.task.no_gradient}.", "; ".join(evidence) + ".",
                   log.task.no_gradient_tries(log.recipe.get("task", {})))


def learning_rate_too_high(log: RunLog, found: set[str]) -> Finding | None:
    """Spikes: a step's gradient norm above 10 times the median of the 10 steps before it (healthy
    demos: up to 4.6 times) and above the largest of the run's first tenth (a converged run's
    gradients are small, and one hard batch is 10 times their median: the demo trained 10,000 steps
    has 562 such steps), or its loss above twice their median, twice their largest and by a quarter
    of where the run started (one batch of hard examples scatters above the median alone: a reward
    model's healthy losses reach 0.57 over a median of 0.2), at 2 steps or more (and 2% of them). A
    sampling task's policy loss scatters around 0 by design: its gradient norm alone."""
    if found & {"failed", "did_not_move"} or len(log.steps) < 20:
        return None
    norms = np.array([s.get("grad_norm") or np.nan for s in log.steps], np.float64)
    start, early_norm = log.first_and_last()[0], np.nanmax(norms[:log.window()], initial=0.0)
    spikes = []
    for i in range(10, len(log.steps)):
        before = log.losses[i - 10:i]
        median, loss = np.median(before), log.losses[i]
        loss_spike = not log.reward_key and loss > 2 * max(median, before.max()) and loss - median > 0.25 * abs(start)
        if loss_spike or norms[i] > max(10 * _finite_median(norms[i - 10:i]), early_norm):
            spikes.append(i)
    if len(spikes) < max(2, 0.02 * len(log.steps)):
        return None
    shown = ", ".join(f"step {log.steps[i]['step']}: loss {_fmt(log.steps[i]['loss'])}, gradient norm "
                      f"{_fmt(norms[i])}" for i in spikes[:3])
    tries = (f"train.lr={_lr(log) / 3:g}",) + ((f"train.warmup_steps={len(log.steps) // 10}",)
                                               if not log.train.get("warmup_steps") else ())
    return Finding("learning_rate_too_high", f"The learning rate looks too high: the loss or the gradient norm "
                                             f"spiked at {len(spikes)} steps.", shown + ".", tries)


def learning_rate_too_low(log: RunLog, found: set[str]) -> Finding | None:
    """The loss barely moved: its last tenth within 5% of its first, over 20 steps or more. A reward
    (which may start at 0, and whose ends scatter by chance: lr 1e-7 on the GRPO demo "rose" from
    -0.19 to 0.06): the line through all its steps rises by under 3 standard errors (the demo: 7)."""
    if found & {"failed", "diverged", "did_not_move", "warmup_never_ended"} or len(log.steps) < 20:
        return None
    first, last = log.first_and_last()
    if (log.fall_t() >= 3) if log.reward_key else (first - last >= 0.05 * abs(first)):
        return None
    lr, steps, w = _lr(log), len(log.steps), log.window()
    trend = f"; the line through its steps rises by {log.fall_t():.2g} standard errors" if log.reward_key else ""
    return Finding("learning_rate_too_low", f"{log.measure.capitalize()} barely moved: the learning rate ({lr:g}) "
                                            f"looks too low.",
                   f"its mean over the first {w} steps was {log.shown(first)}, over the last {w} {log.shown(last)}, "
                   f"in {steps} steps{trend}.", (f"train.lr={lr * 10:g}",))


def warmup_never_ended(log: RunLog, found: set[str]) -> Finding | None:
    """train.warmup_steps at least as many as the run's steps: the learning rate never reached train.lr."""
    warmup, steps = log.train.get("warmup_steps", 0), len(log.steps)
    if found & {"failed", "did_not_move"} or not steps or warmup < steps or log.summary is None:
        return None
    highest = max(s["lr"] for s in log.steps)
    return Finding("warmup_never_ended", f"The warm-up never ended: train.warmup_steps is {warmup}, and the run "
                                         f"took {steps} steps.", f"the learning rate reached {highest:.3g} of "
                                                                 f"train.lr {_lr(log):g}.",
                   (f"train.warmup_steps={max(1, steps // 10)}",))


def overfitting(log: RunLog, found: set[str]) -> Finding | None:
    """Validation worse after its best evaluation (loss: 3% relative; accuracy-like: 0.03; a reward:
    a quarter of what it gained since the first evaluation, and 0.03) while the training loss fell on
    (5%; a reward: rose by twice a window's scatter), over 3 evaluations or more."""
    if found & {"failed", "diverged", "did_not_move"}:
        return None
    metrics = (f"val_{log.reward_key}",) if log.reward_key else ("val_loss", "val_accuracy", "val_macro_f1")
    metric = next((m for m in metrics if all(m in e for e in log.evals)), None)
    evals = [e for e in log.evals if e["step"] <= (log.steps[-1]["step"] if log.steps else 0)]
    if metric is None or len(evals) < 3:
        return None
    values = np.array([e[metric] for e in evals], np.float64)
    lower = metric in LOWER_IS_BETTER
    best = int(values.argmin() if lower else values.argmax())
    if lower:
        worse = values[-1] - values[best] >= 0.03 * abs(values[best])
    else:
        worse = values[best] - values[-1] >= max(0.03, 0.25 * (values[best] - values[0]) if log.reward_key else 0.0)
    best_step, last_step = evals[best]["step"], evals[-1]["step"]
    before = log.losses[[i for i, s in enumerate(log.steps) if s["step"] <= best_step][-log.window():]]
    after = log.losses[[i for i, s in enumerate(log.steps) if best_step < s["step"] <= last_step][-log.window():]]
    if best == len(evals) - 1 or not worse or not len(before) or not len(after):
        return None
    if before.mean() - after.mean() < (2 * log.noise() if log.reward_key else 0.05 * abs(before.mean())):
        return None
    tries = ("train.early_stopping_patience=2", f"train.early_stopping_metric={metric}") + (
        (f"train.eval_every={best_step}",) if not log.train.get("eval_every") else ())
    moved = "rose on" if log.reward_key else "fell on"
    return Finding("overfitting", f"Overfitting from the evaluation at step {best_step}: {metric} "
                                  f"{'rose' if lower else 'fell'} after it while {log.measure} {moved}.",
                   f"{metric} {_fmt(values[best])} at step {best_step}, {_fmt(values[-1])} at step {last_step}; "
                   f"{log.measure} {log.shown(before.mean())} before step {best_step}, {log.shown(after.mean())} by "
                   f"step {last_step}.", tries + (f"train.max_steps={best_step}",))


def collapsed(log: RunLog, found: set[str]) -> Finding | None:
    """A sampling task whose completions became alike: the spread of rewards within a prompt's group
    (`reward_std`) over the last tenth under a tenth of the first tenth's. GRPO then learns nothing more
    (every advantage 0), and a rising reward means one answer found to please the reward: the GRPO
    demo at lr 0.1 repeats "increased" for a reward of 1, 11 nats from where it started."""
    spreads = np.array([s.get("reward_std", np.nan) for s in log.steps], np.float64)
    w = log.window()
    if found & {"failed", "did_not_move"} or len(log.steps) < 20 or np.isnan(spreads).any():
        return None
    early, late = spreads[:w].mean(), spreads[-w:].mean()
    if not early > 0 or late >= 0.1 * early:
        return None
    kl = [s["kl"] for s in log.steps[-w:] if s.get("kl") is not None]
    drift = f"; its KL to the start {_fmt(float(np.mean(kl)))}" if kl else ""
    beta = log.recipe.get("task", {}).get("beta", 0.0)
    return Finding("collapsed", "The completions became alike: every completion of a prompt now earns the same "
                                "reward, so nothing more is learned (with a rising reward, the model found one answer "
                                "that pleases the reward).",
                   f"reward_std, the spread of rewards within a prompt's group, was {_fmt(early)} over the first "
                   f"{w} steps and {_fmt(late)} over the last {w}; the mean reward {log.shown(log.losses[-w:].mean())}"
                   f"{drift}.", (f"task.beta={beta * 4 if beta else 0.04:g}", f"train.lr={_lr(log) / 10:g}"))


def still_falling(log: RunLog, found: set[str]) -> Finding | None:
    """Stopped while the loss was still falling: its last tenth 10% below the tenth before, and by a
    twentieth of the run's whole fall (a healthy run's tail scatters by 15% of a small loss: the demo's
    0.40 to 0.34 after falling from 12.7), over 30 steps or more, and not stopped early. A reward:
    still rising by twice a window's scatter."""
    if found or len(log.steps) < 30 or (log.summary or {}).get("stopped_early"):
        return None
    w = log.window()
    before, last = log.losses[-2 * w:-w].mean(), log.losses[-w:].mean()
    first = log.first_and_last()[0]
    enough = 2 * log.noise() if log.reward_key else 0.1 * abs(before)
    if before - last < enough or before - last < 0.05 * (first - last):
        return None
    steps = len(log.steps)
    more = (f"train.max_steps={2 * steps}",) if log.train.get("max_steps") else (
        f"train.epochs={2 * log.train.get('epochs', 1.0):g}",)
    moving = "rising" if log.reward_key else "falling"
    return Finding("still_falling", f"The run stopped while {log.measure} was still {moving}: more steps would "
                                    "likely help.", f"its mean over steps {steps - 2 * w + 1}-{steps - w} was "
                                                    f"{log.shown(before)}, over the last {w} steps {log.shown(last)}.",
                   more)


def one_class(log: RunLog, found: set[str]) -> Finding | None:
    """A classifier that predicts one class for 90% of the validation sentences, its accuracy within
    0.03 of that class's share."""
    confusion = np.array((log.summary or {}).get("val_confusion") or [[0]], np.int64)
    total = int(confusion.sum())
    if found & {"failed", "diverged", "did_not_move", "warmup_never_ended", "learning_rate_too_high",
                "learning_rate_too_low"} or \
            total == 0 or confusion.shape[0] < 2:  # (those explain a classifier stuck on one class)
        return None
    predicted = confusion.sum(axis=0)
    top = int(predicted.argmax())
    share, accuracy = predicted[top] / total, float(np.trace(confusion)) / total
    class_share = confusion.sum(axis=1)[top] / total
    if share < 0.9 or accuracy > class_share + 0.03:
        return None
    label = (log.summary.get("labels") or [str(i) for i in range(confusion.shape[0])])[top]
    steps = len(log.steps)
    tries = (f"train.max_steps={max(4 * steps, 50)}",) if steps < 50 else (f"train.lr={_lr(log) * 3:g}",)
    return Finding("one_class", f"The classifier predicts one class: {label!r} for almost every sentence.",
                   f"{label!r} for {predicted[top]} of {total} validation sentences; accuracy {accuracy:.3f}, "
                   f"where that class is {class_share:.3f} of them.", tries)


def loss_scale_storms(log: RunLog, found: set[str]) -> Finding | None:
    """float16's loss scaling skipped 3 steps or more (and 5% of them) on overflowing gradients (a run
    that failed says so in its own finding, which offers bfloat16)."""
    skipped = [s["step"] for s in log.steps if s.get("skipped")]
    if "failed" in found or len(skipped) < max(3, 0.05 * len(log.steps)):
        return None
    return Finding("loss_scale_storms", f"float16 gradients overflowed again and again: {len(skipped)} of "
                                        f"{len(log.steps)} steps were skipped while the loss scale came down.",
                   f"skipped steps {', '.join(map(str, skipped[:8]))}{' ...' if len(skipped) > 8 else ''}.",
                   ("dtype=bfloat16",))


CHECKS: tuple[Callable[[RunLog, set[str]], Finding | None], ...] = (
    failed, diverged, did_not_move, warmup_never_ended, learning_rate_too_high, learning_rate_too_low, overfitting,
    collapsed, still_falling, one_class, loss_scale_storms)


def diagnose(log: RunLog) -> list[Finding]:
    """Every finding of the run, in CHECKS' order (each check sees what those before it found).

    Example:
        >>> [finding.kind for finding in diagnose(read_run("runs/demo"))]   # 4 steps of the demo's 10-step warm-up
        ['warmup_never_ended']
    """
    findings: list[Finding] = []
    for check in CHECKS:
        finding = check(log, {f.kind for f in findings})
        if finding is not None:
            findings.append(finding)
    return findings


def healthy_sentence(log: RunLog) -> str:
    """What a run with no findings did, in one sentence."""
    if not log.steps:
        return "No step finished yet."
    first, last = log.first_and_last()
    last_eval = log.evals[-1] if log.evals else {}
    shown = ", ".join(f"{k} {_fmt(last_eval[k])}" for k in _headline_metrics(log, last_eval)[:2])
    return (f"Healthy: {log.measure} went from {log.shown(first)} to {log.shown(last)} (means of the first and last "
            f"{log.window()} of {len(log.steps)} steps)" + (f"; {shown} at step {last_eval['step']}." if shown else "."))


def _headline_metrics(log: RunLog, evaluation: dict) -> list[str]:
    """An evaluation's plain metrics (not TRL's grouped ones); a sampling task's reward first, its
    policy's val_loss (which says little) left out."""
    if log.reward_key:
        names = [f"val_{log.reward_key}"] + [k for k in evaluation if "/" not in k and k != "val_loss"]
    else:
        names = [k for k in evaluation if "/" not in k]
    return [k for k in dict.fromkeys(names) if k.startswith("val_") and isinstance(evaluation.get(k), (int, float))
            and math.isfinite(evaluation[k])]


def doctor(path: str | Path) -> dict:
    """The diagnosis of a run directory, as `twintune doctor --json` prints it.

    Example:
        >>> report = doctor("runs/demo")   # 4 steps of the demo (train.max_steps=4)
        >>> report["healthy"], report["findings"][0]["try"]
        (False, ['train.warmup_steps=1'])
    """
    log = read_run(path)
    findings = diagnose(log)
    return {"run": str(path), "steps": len(log.steps), "finished": log.summary is not None,
            "healthy": not findings, "findings": [f.to_dict() for f in findings],
            "summary": healthy_sentence(log) if not findings else f"{len(findings)} finding"
                                                                  f"{'s' if len(findings) > 1 else ''}."}


def doctor_text(report: dict) -> str:
    """`twintune doctor`'s plain output of a doctor() report."""
    lines = [f"{report['run']}: {report['summary']}"]
    for number, finding in enumerate(report["findings"], 1):
        lines.append(f"{number}. " + Finding(finding["kind"], finding["sentence"], finding["evidence"],
                                             tuple(finding["try"])).text())
    return "\n".join(lines)
