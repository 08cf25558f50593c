"""The one training loop both backends run: data, schedule, logging, evaluation, saving.

Everything here is numpy and plain Python. The backend only sees arrays: token batches,
initial adapter values, a learning rate per step.
"""

from __future__ import annotations

import json
import os
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twintune.backends import backend_class, resolve_backend_name
from twintune.data.batching import Batch, Encoded, Encoder, Prompt, TrainOrder, eval_batches
from twintune.data.mixture import MixtureOrder, mixture_splits
from twintune.train.guards import (
    DISTILL, DISTILL_STREAM, EWC, REPLAY, ReplayOrder, fisher_diagonal, forgetting_summary, general_batch, general_rows,
    loss_weights, perplexity_of,
)
from twintune.data.examples import Example
from twintune.data.shots import ShotIndex, draw_shots, with_shots
from twintune.data.sources import load_examples, stratified_split
from twintune.dropout import dropout_key
from twintune.errors import TwintuneError
from twintune.formats.adapter import save_adapter, write_json
from twintune.formats.checkpoint import load_checkpoint, load_config, load_tokenizer, resolve_model_dir
from twintune.methods import BaseModel, Method, Plan
from twintune.models import GPTNeoSpec, gpt_neo_weights, mlx_lm_has_family
from twintune.quant import SUPPORTED, quantize_linear_layers
from twintune.recipe import Recipe, check_trains_something
from twintune.tasks import Features, head_surgery, with_head
from twintune.train.distributed import (ALONE, World, check_world, launched_world, mine, share, share_bounds,
                                        take_rows)
from twintune.train.features import compute_features, split_features, train_features
from twintune.train.checkpoints import find_checkpoint, load_checkpoint_state, save_checkpoint
from twintune.train.loss_scale import LossScaler
from twintune.train.metrics import classification_report
from twintune.train.plots import plot_run
from twintune.train.schedule import learning_rate


@dataclass
class Run:
    """A recipe made concrete: model and adapter built on a backend, data tokenized."""

    recipe: Recipe
    backend: object
    spec: GPTNeoSpec
    method: Method
    plan: Plan  # released: an unfrozen parameter's start is not kept (Plan.released)
    encoder: Encoder
    splits: dict[str, list[Encoded]]
    order: TrainOrder | MixtureOrder | ReplayOrder | None
    total_steps: int
    model_dir: Path
    loss_scaler: LossScaler | None = None  # float16 only
    examples: dict[str, list[Example]] = field(default_factory=dict)  # the splits' sentences (few-shot prompts)
    classifier: object | None = None  # the features task's (train/features.py FeatureClassifier), once fitted
    sources: dict[str, dict[str, list[Encoded]]] = field(default_factory=dict)  # a mixture's splits, by source
    general: list[Encoded] = field(default_factory=list)  # train.forgetting_eval's text, as causal-LM rows
    distill_rows: list[Encoded] = field(default_factory=list)  # train.distill's general text
    world: World = ALONE  # the processes training together (train/distributed.py); joined in prepare()


def prepare(recipe: Recipe, backend: str | None = None, with_data: bool = True, world: World = ALONE) -> Run:
    """Load model, tokenizer and data for a recipe and apply its method on a backend.

    `with_data=False` skips the data set (for predicting on texts the user gives). With a `world` of
    several processes (train/distributed.py), the backend joins them (and with train.fsdp shards the
    model) before the optimizer's state is made.

    Example:
        >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), backend="mlx")
        >>> run.total_steps   # 3 epochs of 1200 training examples in batches of 16
        225
    """
    name = resolve_backend_name(backend or recipe.backend)
    cls = backend_class(name)  # fail on a missing framework before the slow work
    problem = backend_cannot_run(recipe, name)
    if problem:
        raise TwintuneError(f"{problem}.")
    model_type = load_config(recipe.model).get("model_type")
    if model_type != "gpt_neo" and mlx_lm_has_family(model_type):
        return _prepare_mlx_lm_model(recipe, model_type, name, cls, with_data, world)
    checkpoint = load_checkpoint(recipe.model)
    spec = GPTNeoSpec.from_config(checkpoint.config)
    weights = gpt_neo_weights(spec, checkpoint.weights)
    tokenizer = load_tokenizer(checkpoint.directory)
    base = base_model(recipe, spec, weights, tokenizer)
    plan = run_plan(recipe, base)  # before the model is built: a refused method costs nothing
    engine = cls(spec, base.weights, quantized=base.quantized, dtype=recipe.dtype)
    return _finish(recipe, engine, base, plan, tokenizer, spec.max_positions, checkpoint.directory, with_data, world)


def base_model(recipe: Recipe, spec: GPTNeoSpec, weights: dict[str, np.ndarray], tokenizer=None) -> BaseModel:
    """The frozen model a recipe's method plans on: NF4 layers quantized once here (both backends
    get these bytes); their float weights are dropped."""
    quantization = recipe.quantization()
    quantized = {}
    if quantization and quantization.kind == "nf4":
        quantized = quantize_linear_layers(weights, list(spec.linear_layers()), quantization)
    return BaseModel(spec, weights, quantized, quantization, recipe.dtype, tokenizer)


def run_plan(recipe: Recipe, base: BaseModel) -> Plan:
    """The recipe's method planned on the base, with the task's linear head when it has one."""
    plan = recipe.method.plan(base, recipe.seed)
    if recipe.task.linear_head:
        plan = with_head(plan, head_surgery(len(recipe.prompt.labels), base.spec.hidden_size, recipe.seed))
    return plan


def backend_cannot_run(recipe: Recipe, backend: str) -> str | None:
    """Why a concrete backend cannot run this recipe (a clause, no full stop), or None if it can."""
    q = recipe.quantize
    if q.type != "none" and backend not in SUPPORTED[q.type]:
        return (f"quantize.type {q.type!r} runs on the {' and '.join(SUPPORTED[q.type])} backend only "
                f"(this run uses {backend}); use quantize.type=nf4 for a format both backends share")
    model_type = load_config(recipe.model).get("model_type")
    if backend != "mlx" and model_type != "gpt_neo" and mlx_lm_has_family(model_type):
        return (f"model type {model_type!r} runs on the mlx backend only (through mlx-lm); "
                "the torch backend runs GPT-Neo. Use --backend mlx")
    return None


def _prepare_mlx_lm_model(recipe: Recipe, model_type: str, name: str, cls, with_data: bool, world: World) -> Run:
    """A model of one of mlx-lm's families: MLX only, trained through MLXBackend.from_mlx_lm."""
    if recipe.quantize.type == "nf4":
        raise TwintuneError(f"quantize.type 'nf4' needs a GPT-Neo model; for this {model_type!r} model use "
                            "quantize.type=affine (MLX's own) or none.")
    directory = resolve_model_dir(recipe.model)
    engine = cls.from_mlx_lm(directory, dtype=recipe.dtype)
    base = BaseModel(engine.spec, engine.base_weights(), {}, recipe.quantization(), recipe.dtype)
    plan = run_plan(recipe, base)
    return _finish(recipe, engine, base, plan, load_tokenizer(directory), engine.spec.max_positions, directory,
                   with_data, world)


def _finish(recipe: Recipe, engine, base: BaseModel, plan: Plan, tokenizer, max_positions: int, model_dir: Path,
            with_data: bool, world: World) -> Run:
    """Data, the adapter and the optimizer on a built model: the same for every model."""
    d = recipe.data
    labels = tuple(recipe.prompt.labels)
    prompt = Prompt(recipe.prompt.template, recipe.prompt.labels)
    encoder = Encoder(tokenizer, prompt, max_length=min(d.max_length, max_positions), method=recipe.method,
                      context=max_positions, head=recipe.task.linear_head)
    t = recipe.train
    split, splits, order, total_steps, sources = {}, {}, None, 0, {}
    if with_data and d.mixture:
        length = min(d.max_length, max_positions - recipe.method.virtual_tokens)
        sources = mixture_splits(recipe, tokenizer, length)
        splits = {name: [e for parts in sources.values() for e in parts[name]] for name in ("train", "validation", "test")}
        order = MixtureOrder([parts["train"] for parts in sources.values()], [part.weight for part in d.mixture],
                             t.batch_size, t.grad_accum, recipe.seed)
        total_steps = t.max_steps or max(1, math.ceil(t.epochs * order.steps_per_epoch))
    elif with_data and recipe.task.generative:
        length = min(d.max_length, max_positions - recipe.method.virtual_tokens)
        splits = recipe.task.splits(recipe.data, recipe.data_seed, tokenizer, length)
        order = TrainOrder(splits["train"], t.batch_size, t.grad_accum, recipe.seed, group_by_length=t.group_by_length)
        total_steps = t.max_steps or max(1, math.ceil(t.epochs * order.steps_per_epoch))
    elif with_data:
        examples = load_examples(d.source, subset=d.subset, text_column=d.text_column, label_column=d.label_column,
                                 labels=labels, synthetic_size=d.synthetic_size, seed=recipe.data_seed, split=d.split,
                                 config=d.config)
        split = stratified_split(examples, {"validation": d.validation_fraction, "test": d.test_fraction}, recipe.data_seed)
        splits = {k: encoder.encode_all(v, k) for k, v in split.items()}
        if not splits["validation"]:
            raise TwintuneError("the validation split is empty; raise data.validation_fraction or add examples.")
        order = TrainOrder(splits["train"], t.batch_size, t.grad_accum, recipe.seed, group_by_length=t.group_by_length)
        total_steps = t.max_steps or max(1, math.ceil(t.epochs * order.steps_per_epoch))

    general, distill_rows = [], []
    if with_data:
        length = min(d.max_length, max_positions - recipe.method.virtual_tokens)
        if t.replay.fraction > 0:
            order = ReplayOrder(order, general_rows(t.replay.source, tokenizer, length, REPLAY), t.replay.fraction,
                                recipe.seed)
        if t.forgetting_eval:
            general = general_rows(t.forgetting_eval, tokenizer, length)
        if t.distill.weight > 0:
            distill_rows = general_rows(t.distill.source, tokenizer, length, DISTILL)

    quantization = recipe.quantization()
    if quantization and quantization.kind == "affine":
        engine.quantize_affine(quantization.bits, quantization.group_size)
    engine.apply_method(plan)
    if t.gradient_checkpointing:
        engine.enable_gradient_checkpointing()
    if t.compile:
        engine.enable_compile()
    if world.size > 1:  # the processes meet here, before any optimizer state exists
        engine.join(world)
        if t.fsdp:
            engine.shard(world)
    engine.set_optimizer(tuple(t.betas), t.eps, t.weight_decay)
    if with_data and t.distill.weight > 0:  # the teacher: this model with the method off
        engine.set_base_view(plan, engine.trainable_state())
    if with_data and t.ewc.weight > 0:  # at the start's values, before any step (or resumed state)
        rows = general_rows(t.ewc.source, tokenizer, min(d.max_length, max_positions - recipe.method.virtual_tokens), EWC)
        engine.set_penalty(fisher_diagonal(engine, rows[: t.ewc.samples]), engine.trainable_state(), t.ewc.weight)
    scaler = LossScaler() if recipe.dtype == "float16" else None
    # The run does not keep the base's numpy weights: the backend holds the model now.
    return Run(recipe, engine, base.spec, recipe.method, plan.released(), encoder, splits, order, total_steps,
               Path(model_dir), scaler, split, sources=sources, general=general, distill_rows=distill_rows,
               world=world)


def train_step(run: Run, step: int) -> dict:
    """One optimizer step: the step's micro-batches, accumulated, then clip + AdamW.

    In float16 the loss is scaled (LossScaler); a step whose gradients overflowed is skipped,
    logged with "skipped": true, and still counts as a step of the schedule.
    """
    t = run.recipe.train
    batches = run.order.step_batches(step)  # the whole step's, on every process
    scale = run.loss_scaler.scale if run.loss_scaler else 1.0
    # Each process runs its share of every micro-batch; the weights are the whole step's (global) counts.
    sums = [_share_forward_backward(run, b, scale * weight, dropout_key(run.recipe.seed, step, i))
            for i, (b, weight) in enumerate(zip(batches, loss_weights(batches, t.replay.fraction)))]
    sync_seconds = None
    if run.world.size > 1:
        started = time.perf_counter()
        sums = run.backend.all_sum(np.array(sums, np.float64)).tolist()
        run.backend.sum_gradients()
        sync_seconds = time.perf_counter() - started  # waiting for the slowest process included
    loss = sum(s for s, b in zip(sums, batches) if not b.replay) / sum(b.n_targets for b in batches if not b.replay)
    if not math.isfinite(loss):
        raise TwintuneError(f"the training loss became {loss} at step {step + 1}; lower train.lr "
                            "or set train.max_grad_norm (the last saved adapter, if any, is kept).")
    divergence = None
    if t.distill.weight > 0:  # weight * T^2 * the mean KL(base || model) per general-text token
        batch = general_batch(run.distill_rows, t.distill.rows, step, run.recipe.seed, DISTILL_STREAM)
        divergence = run.backend.distill_backward(batch, t.distill.temperature,
                                                  scale * t.distill.weight / batch.n_targets,
                                                  dropout_key(run.recipe.seed, step, len(batches))) / batch.n_targets
    penalty = None
    if t.ewc.weight > 0:  # its value before the step, and its gradient added to the step's
        penalty = run.backend.penalty()
        run.backend.add_penalty_gradients(scale)
    lr = learning_rate(step, t.lr, run.total_steps, t.warmup_steps, t.schedule)
    grad_norm = run.backend.optimizer_step(lr, t.max_grad_norm, grad_scale=scale)
    finite = math.isfinite(grad_norm)
    if not finite and scale <= 1.0:
        raise TwintuneError(f"the gradients became {grad_norm} at step {step + 1}; lower train.lr or use "
                            "dtype=float32 (the last saved adapter, if any, is kept).")
    record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm if finite else None,
              "tokens": sum(b.n_real_tokens for b in batches)}
    if run.world.size > 1:  # the examples each process took
        record["rank_examples"] = np.sum([np.diff(share_bounds(b.input_ids.shape[0], run.world)) for b in batches],
                                         axis=0).tolist()
        record["sync_seconds"] = sync_seconds
    if batches[-1].replay:  # the general text's mean loss per token, beside the task's
        record["replay_loss"] = sums[-1] / batches[-1].n_targets
    if penalty is not None:
        record["ewc_penalty"] = penalty
    if divergence is not None:
        record["distill_kl"] = divergence
    if run.loss_scaler:
        run.loss_scaler.update(finite)
        record["skipped"] = not finite
    return record


def _share_forward_backward(run: Run, batch: Batch, loss_scale: float, key: int) -> float:
    """This process's share of a micro-batch, forward and backward; its summed loss. A batch with fewer
    rows than processes leaves some without a share: they add nothing, but a sharded model's
    gathers need every process in every forward, so those run one row at weight zero."""
    part = share(batch, run.world)
    if part is not None:
        return run.backend.forward_backward(part, loss_scale, key)
    if run.backend.sharded:
        run.backend.forward_backward(take_rows(batch, 0, 1), 0.0, key)
    return 0.0


def predict(run: Run, encoded: list[Encoded], features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and label-word log-probabilities (N, K) for encoded examples, in their order
    (a features run: its classifier's log-probabilities, on `features` when given)."""
    if run.classifier is not None:
        if features is None:
            features = compute_features(run, encoded, run.classifier.pooling, run.classifier.layer)
        scores = run.classifier.log_probabilities(features)
        return scores.argmax(axis=1), scores
    scores = np.zeros((len(encoded), len(run.encoder.first_label_ids)), np.float32)
    with run.backend.whole_model():  # this process's batches, however many
        for batch in mine(eval_batches(encoded, run.recipe.train.eval_batch_size), run.world):
            scores[batch.example_index] = run.backend.label_logprobs(batch, run.encoder.first_label_ids)
    if run.world.size > 1:  # each process filled its batches' rows; the rest are zeros
        scores = run.backend.all_sum(scores).astype(np.float32)
    return scores.argmax(axis=1), scores


def evaluate(run: Run, split: str = "validation") -> dict:
    """Accuracy, macro-F1, per-class precision/recall and confusion matrix on a split.

    Example:
        >>> evaluate(run, "validation")["confusion"]   # rows: true class, columns: predicted
    """
    encoded = run.splits[split]
    if not encoded:
        raise TwintuneError(f"the {split} split is empty.")
    if run.recipe.task.generative:
        report = perplexity_report(run, encoded)
        if run.sources:  # a mixture: each source's own figures beside the whole's
            report["sources"] = {name: perplexity_report(run, parts[split]) for name, parts in run.sources.items()
                                 if parts[split]}
        return report
    if run.classifier is not None:  # a features run reads the split's cached features
        return _report(run, encoded, split_features(run, split, run.classifier.pooling, run.classifier.layer))
    return _report(run, encoded)


def evaluate_with_shots(run: Run, split: str, shots: int, retrieve: bool = False) -> dict:
    """`evaluate` with `shots` training sentences of each class before every sentence (in-context
    learning: data/shots.py), drawn with the recipe's seed, or with `retrieve` the ones nearest to
    each sentence by the model's own features (the features task's cache: RETRIEVAL_POOLING pooled
    final hidden states, cosine similarity); a retrieved report carries the random shots' accuracy
    beside its own. Where the shots do not fit the model's context with the split's longest
    sentence, as many as fit, with a note; none fitting is an error.

    Example:
        >>> evaluate_with_shots(prepare(load_recipe("recipes/demo-financial-sentiment.yaml")), "test", 2)["shots"]
        2
    """
    if shots < 0:
        raise TwintuneError(f"--shots must be 0 or more, got {shots}.")
    if run.recipe.task.generative:
        raise TwintuneError(f"--shots puts labelled sentences before each sentence; a {run.recipe.task.name} run has "
                            "no labels (evaluate its perplexity without --shots).")
    if run.classifier is not None:
        raise TwintuneError("--shots puts labelled sentences with their label words before each sentence, but this "
                            "is a features run, whose classifier reads no label words; evaluate it without --shots.")
    if run.encoder.head:
        raise TwintuneError("--shots puts labelled sentences with their label words before each sentence, but this "
                            "run classifies with a linear head, which reads no label words; evaluate it without --shots.")
    if shots == 0:
        if retrieve:
            raise TwintuneError("--retrieve chooses the --shots sentences; give --shots 1 or more.")
        return {**evaluate(run, split), "shots": 0, "shots_asked": 0, "shots_note": None}
    labels, seed = run.encoder.prompt.labels, run.recipe.seed
    report = _shots_report(run, split, shots, lambda used: [draw_shots(run.examples["train"], used, labels, seed)]
                           * len(run.examples[split]))
    if not retrieve:
        return report
    index = ShotIndex(run.examples["train"], split_features(run, "train", RETRIEVAL_POOLING), labels)
    queries = split_features(run, split, RETRIEVAL_POOLING)
    own = split == "train"  # a training sentence is not its own demonstration
    retrieved = _shots_report(run, split, shots, lambda used: [index.nearest(q, used, i if own else None)
                                                               for i, q in enumerate(queries)])
    return {**retrieved, "retrieved": True,
            "random_shots": {key: report[key] for key in ("accuracy", "macro_f1", "shots", "predictions")}}


RETRIEVAL_POOLING = "mean"  # the pooling whose classifier reads the demo best (0.70, against 0.56 for last)


def _shots_report(run: Run, split: str, shots: int, choose) -> dict:
    """The report with the most shots up to `shots` that fit the context; `choose(k)` gives each
    sentence's demonstrations (k of each class)."""
    encoder, context = run.encoder, run.encoder.context
    for used in range(shots, 0, -1):
        chosen = choose(used)  # outside the try: too few sentences of a class is the user's error
        try:
            encoded = [Encoder(encoder.tokenizer, with_shots(encoder.prompt, demonstrations), max_length=context,
                               method=run.method, context=context).encode(e.text, e.label, f" #{i} of the {split} split")
                       for i, (e, demonstrations) in enumerate(zip(run.examples[split], chosen))]
        except TwintuneError:  # too long for the context: one shot of each class fewer
            continue
        note = None if used == shots else (f"{shots} shots of each class do not fit the model's {context} positions "
                                           f"with the {split} split's longest sentence; {used} do")
        return {**_report(run, encoded), "shots": used, "shots_asked": shots, "shots_note": note}
    raise TwintuneError(f"not even one shot of each class fits the model's {context} positions with the {split} "
                        "split's longest sentence; use --shots 0 or shorter sentences.")


def perplexity_report(run: Run, encoded: list[Encoded]) -> dict:
    """The mean cross-entropy per target token and its exponential, the perplexity."""
    total, tokens = 0.0, 0
    with run.backend.whole_model():
        for batch in mine(eval_batches(encoded, run.recipe.train.eval_batch_size), run.world):
            total += run.backend.target_loss(batch)
            tokens += batch.n_targets
    if run.world.size > 1:
        total, tokens = run.backend.all_sum(np.array([total, tokens], np.float64)).tolist()
        tokens = round(tokens)
    return {"loss": total / tokens, "perplexity": math.exp(total / tokens), "tokens": tokens}


def logged_metrics(report: dict) -> dict:
    """What a run logs of an evaluation: accuracy and macro-F1, or a generative task's loss and perplexity."""
    if "perplexity" in report:
        per_source = {f"val_{key}/{name}": figures[key] for name, figures in report.get("sources", {}).items()
                      for key in ("loss", "perplexity")}
        return {"val_loss": report["loss"], "val_perplexity": report["perplexity"], **per_source}
    return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}


def _report(run: Run, encoded: list[Encoded], features: np.ndarray | None = None) -> dict:
    predictions, _ = predict(run, encoded, features)
    labels = np.array([e.label for e in encoded])
    report = classification_report(labels, predictions, run.encoder.prompt.labels)
    report["predictions"] = predictions.tolist()
    return report


def default_out_dir(recipe: Recipe, backend: str) -> Path:
    return Path("runs") / f"{recipe.name}-{backend}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(recipe: Recipe, backend: str | None = None, out_dir: str | Path | None = None,
          progress: bool = True, resume: str | Path | None = None) -> dict:
    """Train a recipe on a backend; write the adapter, metrics.jsonl, a plot and summary.json to out_dir.

    With `resume` (a run directory or one of its checkpoints) training continues from the
    checkpoint and ends with the same adapter and loss log as a run that was never stopped.

    Example:
        >>> summary = train(load_recipe("recipes/demo-financial-sentiment.yaml"), backend="torch", out_dir="runs/demo")
        >>> summary["val_accuracy"], summary["out_dir"]
    """
    check_trains_something(recipe)
    name = resolve_backend_name(backend or recipe.backend)
    resumed = None
    if resume is not None and isinstance(recipe.task, Features):
        raise TwintuneError("a features run has no checkpoints to resume (its features are cached: train it again).")
    if resume is not None:
        found = find_checkpoint(resume)
        resumed = load_checkpoint_state(found)
        _check_same_recipe(resumed[0]["recipe"], recipe.to_dict(), found)
        _check_backend_can_resume(recipe, name, resumed[0]["history"], found)
        out = Path(out_dir) if out_dir else found.parent.parent
    else:
        out = Path(out_dir) if out_dir else default_out_dir(recipe, name)
    world = launched_world()
    check_world(world, name, recipe)
    if world.writes:
        _check_writable(out)
    run = prepare(recipe, name, world=world)
    if isinstance(recipe.task, Features):
        return _train_features(run, out)
    t = recipe.train
    history = {"log": [], "real_tokens": 0, "train_seconds": 0.0, "best": None, "backends": []}
    first_step, best_state = 0, None
    if resumed:
        state, trainable, optimizer, best_state = resumed
        run.backend.set_trainable_state(trainable)
        run.backend.set_optimizer_state(optimizer)
        history, first_step = state["history"], state["step"]
        if run.loss_scaler:
            run.loss_scaler = LossScaler(**history["loss_scale"])
    # Which backend ran which steps: a resumed run adds a segment, on whichever backend it runs.
    segments = history.setdefault("backends", [])
    segments.append({"backend": name, "first_step": first_step + 1, "last_step": first_step,
                     "processes": world.size})
    if world.writes:
        write_json(out / "recipe.json", recipe.to_dict())
    if t.forgetting_eval and "forgetting_before" not in history:  # measured once, before the first step
        history["forgetting_before"] = perplexity_of(run, run.general)

    bar = _progress(run.total_steps, progress and world.writes, first_step)
    started = time.perf_counter()
    stopped_early = history.get("stopped_early", False)  # a resumed run that had already stopped early
    last_step = first_step
    # metrics.jsonl is rewritten from the history, so lines a killed run wrote after its last
    # checkpoint do not appear twice.
    with open(out / "metrics.jsonl" if world.writes else os.devnull, "w") as log:
        for line in history["log"]:
            log.write(json.dumps(line) + "\n")
        for step in range(first_step, first_step if stopped_early else run.total_steps):
            record = train_step(run, step)
            last_step = segments[-1]["last_step"] = step + 1
            history["real_tokens"] += record["tokens"]
            _log(log, history, record)
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < run.total_steps:
                _log(log, history, {"step": step + 1, **logged_metrics(evaluate(run))})
                if t.early_stopping_patience:
                    value = history["log"][-1][t.early_stopping_metric]
                    if history["best"] is None or better(t.early_stopping_metric, value, history["best"]["value"]):
                        history["best"] = {"step": step + 1, "value": value}
                        best_state = run.backend.trainable_state()
                    evals_since_best = (step + 1 - history["best"]["step"]) // t.eval_every
                    stopped_early = history["stopped_early"] = evals_since_best >= t.early_stopping_patience
            saves = t.save_every and ((step + 1) % t.save_every == 0 or step + 1 == run.total_steps or stopped_early)
            if saves and (world.writes or run.backend.sharded):  # sharded: every process gathers its shards
                history["train_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                if run.loss_scaler:
                    history["loss_scale"] = run.loss_scaler.state()
                trainable, optimizer = run.backend.trainable_state(), run.backend.optimizer_state()
                if world.writes:
                    save_checkpoint(out, step + 1, trainable, optimizer, recipe.to_dict(), history, t.keep_last,
                                    best_state)
            if bar:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                bar.update(1)
            if stopped_early:
                break
        history["train_seconds"] += time.perf_counter() - started
        if best_state is not None:  # early stopping: the best evaluation's adapter is the result
            run.backend.set_trainable_state(best_state)
        report = evaluate(run)
        final = logged_metrics(report)
        final_step = history["best"]["step"] if best_state is not None else last_step
        _log(log, history, {"step": final_step, **final})
    if bar:
        bar.close()

    trained = run.backend.trainable_state()
    if not world.writes:  # the same model on every process; rank 0 saves it
        return {"backend": name, "rank": world.rank, "world_size": world.size, "out_dir": str(out)}
    save_adapter(out / "adapter", run.method, trained, recipe.model, run.model_dir,
                 labels=list(recipe.prompt.labels) if recipe.task.linear_head else None)
    losses = [line["loss"] for line in history["log"] if "loss" in line]
    evals = [line for line in history["log"] if set(line) & {"val_accuracy", "val_perplexity"}]
    seconds = history["train_seconds"]
    summary = {
        "backend": name,
        "method": run.method.name,
        "task": recipe.task.to_dict(),
        "model": recipe.model,
        "recipe": recipe.name,
        "seed": recipe.seed,
        "steps": len(losses),
        "planned_steps": run.total_steps,
        "stopped_early": stopped_early,
        "best": history["best"],
        "resumed_from_step": first_step or None,
        "backend_steps": [s for s in segments if s["last_step"] >= s["first_step"]],
        "trainable_params": int(sum(v.size for v in trained.values())),
        "final_train_loss": losses[-1],
        "train_losses": losses,
        **final,
        **({} if "perplexity" in report else {"val_per_class": report["per_class"], "val_confusion": report["confusion"],
                                             "labels": report["labels"]}),
        "evals": evals,
        **({"forgetting": forgetting_summary(t.forgetting_eval, history["forgetting_before"],
                                             perplexity_of(run, run.general))} if t.forgetting_eval else {}),
        "train_seconds": seconds,
        "real_tokens_per_second": history["real_tokens"] / seconds if seconds > 0 else 0.0,
        "peak_memory_mb": run.backend.peak_memory_mb(),
        "world_size": world.size,
        "engine": world.engine,
        "fsdp": run.backend.sharded,
        "out_dir": str(out),
    }
    write_json(out / "summary.json", summary)
    plot_run(out / "training.png", losses, evals, title=f"{recipe.name} ({name})")
    return summary


def _train_features(run: Run, out: Path) -> dict:
    """The features task's run directory: recipe.json, classifier/, summary.json (train/features.py)."""
    write_json(out / "recipe.json", run.recipe.to_dict())
    result = train_features(run, out)
    summary = {"backend": run.backend.name, "method": run.method.name, "task": run.recipe.task.to_dict(),
               "model": run.recipe.model, "recipe": run.recipe.name, "seed": run.recipe.seed, "steps": 0, **result,
               "peak_memory_mb": run.backend.peak_memory_mb(), "out_dir": str(out)}
    write_json(out / "summary.json", summary)
    return summary


def better(metric: str, value: float, best: float) -> bool:
    """Whether an evaluation improves on the best: accuracy and F1 up, loss and perplexity down."""
    return value < best if metric in ("val_loss", "val_perplexity") else value > best


def _log(log, history: dict, line: dict) -> None:
    history["log"].append(line)
    log.write(json.dumps(line) + "\n")
    log.flush()


def _check_backend_can_resume(recipe: Recipe, backend: str, history: dict, checkpoint: Path) -> None:
    """A checkpoint resumes on either backend (the same numbers, the same files), unless the
    recipe needs what only its own backend has (MLX's affine quantization, an mlx-lm model)."""
    problem = backend_cannot_run(recipe, backend)
    if problem:
        trained_on = (history.get("backends") or [{"backend": "another backend"}])[-1]["backend"]
        raise TwintuneError(f"cannot resume {checkpoint} on {backend}: it was trained on {trained_on} and {problem}.")


# Keys that say how the processes hold the model, not what is trained: a sharded run's checkpoint
# resumes on one process, or on MLX, which has no sharding.
HOW_NOT_WHAT = {"train.fsdp"}


def _check_same_recipe(saved: dict, current: dict, checkpoint: Path) -> None:
    """A resumed run must be the same run: only the progress bar (and HOW_NOT_WHAT) may differ. The
    saved recipe is read again first, so keys added since it was written (at their defaults) are no
    difference."""
    from twintune.recipe import recipe_from_dict

    saved = recipe_from_dict(saved).to_dict()
    differences = [key for key in sorted(set(_flatten(saved)) | set(_flatten(current)))
                   if _flatten(saved).get(key) != _flatten(current).get(key) and key not in HOW_NOT_WHAT]
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


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TwintuneError(f"output directory {out} is not writable ({e.strerror}).") from None


def _progress(total: int, enabled: bool, done: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)
