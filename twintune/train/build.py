"""A recipe becomes a run: the base opened, the method planned, the data tokenized into splits and a
training order, the backend built with the method performed and the optimizer made.

Everything here is numpy and plain Python. The backend only sees arrays: weights, the plan's
initial values, token batches.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from twintune.backends import CAPABILITIES, backend_class, capabilities, resolve_backend_name
from twintune.backends.base import Backend
from twintune.data.batching import Encoded, Encoder, Prompt, TrainOrder
from twintune.data.chat import read_chat_template
from twintune.data.examples import Example
from twintune.data.mixture import MixtureOrder, source_name
from twintune.errors import TwintuneError, TwintuneWarning
from twintune.formats.adapter import check_adapter_fits, check_adapter_method, load_adapter
from twintune.formats.checkpoint import load_checkpoint, load_config, load_tokenizer, resolve_model_dir
from twintune.methods import BaseModel, Method, Plan
from twintune.models import GPTNeoSpec, gpt_neo_weights, mlx_lm_has_family
from twintune.quant import quantize_linear_layers
from twintune.recipe import Recipe, load_recipe
from twintune.tasks import task_from_dict
from twintune.tasks.reward import REWARD_LABELS
from twintune.train.distributed import ALONE, World
from twintune.train.guards import DISTILL, EWC, REPLAY, general_rows
from twintune.train.loss_scale import LossScaler
from twintune.train.references import fill_references, reference_identity
from twintune.train.rollouts import Rollouts
from twintune.train.terms import Distillation, ElasticWeights, LossTerm, Replay


@dataclass
class Run:
    """A recipe made concrete: model and adapter built on a backend, data tokenized."""

    recipe: Recipe
    backend: Backend
    spec: GPTNeoSpec
    method: Method
    plan: Plan  # released: an unfrozen parameter's start is not kept (Plan.released)
    encoder: Encoder
    splits: dict[str, list[Encoded]]
    order: TrainOrder | MixtureOrder | None
    total_steps: int
    model_dir: Path
    loss_scaler: LossScaler | None = None  # float16 only
    examples: dict[str, list[Example]] = field(default_factory=dict)  # the splits' sentences (few-shot prompts)
    classifier: object | None = None  # the features task's (train/features.py FeatureClassifier), once fitted
    sources: dict[str, dict[str, list[Encoded]]] = field(default_factory=dict)  # a mixture's splits, by source
    general: list[Encoded] = field(default_factory=list)  # train.forgetting_eval's text, as causal-LM rows
    terms: list[LossTerm] = field(default_factory=list)  # replay, distillation, EWC: the step's loss beside the task's
    world: World = ALONE  # the processes training together (train/distributed.py); joined in prepare()
    reward_model: Backend | None = None  # task.reward_model's run, frozen: it scores sampled completions
    rollouts: Rollouts | None = None  # PPO's current rollout (train/rollouts.py)

    def term(self, cls: type) -> LossTerm | None:
        """The run's loss term of a kind (Replay, Distillation, ElasticWeights), or None."""
        return next((t for t in self.terms if isinstance(t, cls)), None)

    @property
    def distill_rows(self) -> list[Encoded]:
        """train.distill's general text, as causal-LM rows (none without distillation)."""
        distillation = self.term(Distillation)
        return distillation.rows if distillation else []


def prepare(recipe: Recipe, backend: str | None = None, with_data: bool = True, world: World = ALONE) -> Run:
    """Load model, tokenizer and data for a recipe and apply its method on a backend.

    `with_data=False` skips the data set (for predicting on texts the user gives). With a `world` of
    several processes (train/distributed.py), the backend joins them (and with train.fsdp shards the
    model) before the optimizer's state is made.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), backend="mlx")
        >>> run.total_steps   # 2 epochs of 2400 training examples in batches of 16
        300
    """
    opened = open_base(recipe, backend or recipe.backend, with_plan=True)
    return _finish(recipe, opened, with_data, world)


@dataclass
class Opened:
    """A base opened on a backend, before any method is performed: the backend's model, the base
    methods plan on, the tokenizer, the model's context, the directory its files came from, and the
    recipe's plan when asked for."""

    backend: Backend
    base: BaseModel
    tokenizer: object
    max_positions: int
    directory: Path
    plan: Plan | None = None


def open_base(recipe: Recipe, backend: str, with_plan: bool = False) -> Opened:
    """The recipe's base model on a backend: GPT-Neo (a local directory, a hub id, builtin:tiny-gpt-neo;
    its linear layers NF4-quantized once here when the recipe says so) or a model of one of mlx-lm's
    families (MLX only), with MLX's affine quantization when the recipe asks. `with_plan`: the recipe's
    method planned on the base too, before the backend builds a GPT-Neo (a refused method costs nothing).

    Example:
        >>> from twintune.recipe import load_recipe
        >>> open_base(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch").max_positions
        512
    """
    name = resolve_backend_name(backend)
    cls = backend_class(name)  # fail on a missing framework before the slow work
    problem = backend_cannot_run(recipe, name)
    if problem:
        raise TwintuneError(f"{problem}.")
    model_type = load_config(recipe.model).get("model_type")
    if model_type != "gpt_neo" and mlx_lm_has_family(model_type):
        opened = _open_mlx_lm_model(recipe, model_type, cls, with_plan)
    else:
        base, directory = read_gpt_neo(recipe)
        plan = run_plan(recipe, base) if with_plan else None
        built = cls(base.spec, base.weights, quantized=base.quantized, dtype=recipe.dtype)
        opened = Opened(built, base, base.tokenizer, base.spec.max_positions, directory, plan)
    quantization = opened.base.quantization
    if quantization and quantization.type == "affine":
        opened.backend.quantize_affine(quantization.bits, quantization.group_size)
    return opened


def _open_mlx_lm_model(recipe: Recipe, model_type: str, cls, with_plan: bool) -> Opened:
    """A model of one of mlx-lm's families: MLX only, built through MLXBackend.from_mlx_lm (its plan
    made from the built model's weights, before the tokenizer is read)."""
    if recipe.quantize.type == "nf4":
        raise TwintuneError(f"quantize.type 'nf4' needs a GPT-Neo model; for this {model_type!r} model use "
                            "quantize.type=affine (MLX's own) or none.")
    directory = resolve_model_dir(recipe.model)
    backend = cls.from_mlx_lm(directory, dtype=recipe.dtype)
    base = BaseModel(backend.spec, backend.base_weights(), {}, recipe.quantization(), recipe.dtype)
    plan = run_plan(recipe, base) if with_plan else None
    return Opened(backend, base, load_tokenizer(directory), backend.spec.max_positions, Path(directory), plan)


def read_gpt_neo(recipe: Recipe) -> tuple[BaseModel, Path]:
    """The recipe's GPT-Neo read as numpy (config.json, safetensors, the tokenizer) and the directory it
    came from: the base a method plans on, merges into, and a backend is built from. NF4 layers are
    quantized here (their float weights dropped)."""
    checkpoint = load_checkpoint(recipe.model)
    spec = GPTNeoSpec.from_config(checkpoint.config)
    weights = gpt_neo_weights(spec, checkpoint.weights)
    quantization, quantized = recipe.quantization(), {}
    if quantization and quantization.type == "nf4":  # once, here: both backends get these bytes
        quantized = quantize_linear_layers(weights, list(spec.linear_layers()), quantization)
    base = BaseModel(spec, weights, quantized, quantization, recipe.dtype, load_tokenizer(checkpoint.directory))
    return base, Path(checkpoint.directory)


def run_plan(recipe: Recipe, base: BaseModel) -> Plan:
    """The recipe's method planned on the base, with what the task trains besides it (a linear head)."""
    plan = recipe.method.plan(base, recipe.seed)
    extra = recipe.task.surgeries(base.spec, len(recipe.task.head_labels(recipe) or []), recipe.seed)
    return Plan(plan.method, plan.surgeries + extra, plan.lr_scales) if extra else plan


def backend_cannot_run(recipe: Recipe, backend: str) -> str | None:
    """Why a concrete backend cannot run this recipe (a clause, no full stop), or None if it can."""
    q, able = recipe.quantize, capabilities(backend)
    if q.type != "none" and q.type not in able.quantizations:
        others = [name for name, other in CAPABILITIES.items() if q.type in other.quantizations]
        return (f"quantize.type {q.type!r} runs on the {' and '.join(others)} backend only "
                f"(this run uses {backend}); use quantize.type=nf4 for a format both backends share")
    model_type = load_config(recipe.model).get("model_type")
    if not able.mlx_lm_models and model_type != "gpt_neo" and mlx_lm_has_family(model_type):
        others = [name for name, other in CAPABILITIES.items() if other.mlx_lm_models]
        return (f"model type {model_type!r} runs on the {' and '.join(others)} backend only (through mlx-lm); "
                f"the {backend} backend runs GPT-Neo. Use --backend {others[0]}")
    return None


def _finish(recipe: Recipe, opened: Opened, with_data: bool, world: World) -> Run:
    """Data, the adapter and the optimizer on a built model: the same for every model."""
    plan, context = opened.plan, opened.max_positions
    if recipe.data.max_length > context:
        warnings.warn(f"data.max_length {recipe.data.max_length} is beyond the model's {context} positions; rows are "
                      f"cut at {context}.", TwintuneWarning, stacklevel=3)
    encoder = Encoder(opened.tokenizer, Prompt(recipe.prompt.template, recipe.prompt.labels),
                      max_length=min(recipe.data.max_length, context), method=recipe.method, context=context,
                      head=recipe.task.linear_head, chat=read_chat_template(opened.directory, recipe.data.chat_template),
                      # GPT-Neo's own model runs pairs that share a prompt (Batch.segments); mlx-lm's models and
                      # virtual tokens (which would need their own places in the mask) keep a row an answer.
                      share_prompts=isinstance(opened.base.spec, GPTNeoSpec) and not recipe.method.virtual_tokens)
    run = Run(recipe, opened.backend, opened.base.spec, recipe.method, plan, encoder, {}, None, 0, opened.directory,
              world=world)
    if with_data:
        _add_data(run, opened.tokenizer, row_length(recipe, context))
    _set_up_backend(run, plan)
    objective = recipe.task.objective
    if objective is not None and objective.needs_reference:  # the reference: the start, the method switched off
        run.backend.set_base_view(plan, run.backend.trainable_state())
        if with_data and (recipe.task.reference or recipe.task.precompute_reference):
            _precompute_references(run)
    if with_data and recipe.task.reward_model:
        run.reward_model = _open_reward_model(Path(recipe.task.reward_model), recipe, run.backend.name, opened.tokenizer)
    if with_data:
        run.terms = _loss_terms(run, plan, opened.tokenizer, row_length(recipe, context))
    run.loss_scaler = LossScaler() if recipe.dtype == "float16" else None
    run.plan = plan.released()  # the run does not keep the base's numpy weights: the backend holds the model now
    return run


def _precompute_references(run: Run) -> None:
    """The reference log-probabilities of every split's rows, once (train/references.py): the base view's,
    or those of the run task.reference names (opened only when the cache lacks them, then let go)."""
    recipe = run.recipe
    settings = f"{recipe.quantization()}|{recipe.dtype}"
    if not recipe.task.reference:
        fill_references(run.splits, lambda batch: run.backend.target_values(batch, "logps", reference=True),
                        recipe.train.eval_batch_size, reference_identity(run.model_dir, settings))
        return
    path = Path(recipe.task.reference)
    other = _reference_recipe(path, recipe)  # checked before anything is read
    opened: list[Backend] = []

    def values(batch):
        if not opened:
            opened.append(_open_trained(path, other, run.backend.name))
        return opened[0].target_values(batch, "logps")

    fill_references(run.splits, values, recipe.train.eval_batch_size,
                    reference_identity(run.model_dir, settings, path / "adapter"))


def _finished_run_recipe(path: Path, where: str) -> Recipe:
    """The recipe of the run directory a task key (`where`) names, which must have finished (an adapter)."""
    if not (path / "recipe.json").is_file():
        raise TwintuneError(f"{where} is not a run directory: it has no recipe.json.")
    if not (path / "adapter").is_dir():
        raise TwintuneError(f"{where} has no adapter: it has not finished (continue it with twintune train --resume).")
    return load_recipe(path / "recipe.json")


def _reference_recipe(path: Path, recipe: Recipe) -> Recipe:
    """The recipe of the run task.reference names, checked: a finished run on this base whose model
    generates; made to run on this recipe's base (its quantization and dtype)."""
    where = f"task.reference {path}"
    other = _finished_run_recipe(path, where)
    if other.model != recipe.model:
        raise TwintuneError(f"{where} was trained on {other.model}, but this run's model is {recipe.model}; a reference "
                            "run must share the base model (and its tokenizer).")
    if other.task.head_labels(other) is not None:
        raise TwintuneError(f"{where} is a {other.task.name} run with a linear head, which scores answers instead of "
                            "predicting their tokens; name a run whose model generates.")
    return dataclasses.replace(other, model=recipe.model, quantize=recipe.quantize, dtype=recipe.dtype,
                               method=other.method.saved_method())


def _open_reward_model(path: Path, recipe: Recipe, backend: str, tokenizer) -> Backend:
    """The reward-model run task.reward_model names, on its own base in this run's dtype, frozen: checked to be a finished
    reward run whose tokenizer is this model's (it scores this run's token ids)."""
    where = f"task.reward_model {path}"
    other = _finished_run_recipe(path, where)
    if other.task.head_labels(other) != REWARD_LABELS:
        raise TwintuneError(f"{where} is a {other.task.name} run; a reward model is a run of task reward (a one-output "
                            "head that scores an answer).")
    if load_tokenizer(resolve_model_dir(other.model)).to_str() != tokenizer.to_str():
        raise TwintuneError(f"{where} reads text with another tokenizer ({other.model}'s) than this run's model "
                            f"({recipe.model}); it would score other tokens than these completions: train the reward "
                            "model on a model with this tokenizer.")
    # in this run's dtype (float64 proof runs stay float64 throughout), on its own base and quantization
    return _open_trained(path, dataclasses.replace(other, method=other.method.saved_method(), dtype=recipe.dtype),
                         backend)


def _open_trained(path: Path, other: Recipe, backend: str) -> Backend:
    """The run at `path` (its recipe `other`): its trained adapter (and head) on its base, frozen."""
    opened = open_base(other, backend, with_plan=True)
    opened.backend.apply_method(opened.plan)
    method, state = load_adapter(path / "adapter", opened.base.spec)
    check_adapter_method(method, other.method, path / "adapter")
    check_adapter_fits(state, {k: v.shape for k, v in opened.backend.trainable_state().items()}, method,
                       path / "adapter")
    opened.backend.set_trainable_state(state)
    return opened.backend


def row_length(recipe: Recipe, max_positions: int) -> int:
    """The longest row of generated or general text: data.max_length, within the context the method leaves."""
    return min(recipe.data.max_length, max_positions - recipe.method.virtual_tokens)


def _add_data(run: Run, tokenizer, length: int) -> None:
    """The run's splits and its training order (a mixture's sources, or the task's own data), and the
    general text a forgetting evaluation reads."""
    recipe, t = run.recipe, run.recipe.train
    if recipe.data.mixture:
        run.sources = mixture_splits(recipe, tokenizer, length, run.encoder.chat)
        run.splits = {name: [e for parts in run.sources.values() for e in parts[name]]
                      for name in ("train", "validation", "test")}
        run.order = MixtureOrder([parts["train"] for parts in run.sources.values()],
                                 [part.weight for part in recipe.data.mixture], t.batch_size, t.grad_accum, recipe.seed)
    else:
        data = recipe.task.data(recipe.data, recipe.data_seed, run.encoder, length)
        run.splits, run.examples = data.splits, data.examples
        run.order = TrainOrder(run.splits["train"], t.batch_size, t.grad_accum, recipe.seed,
                               group_by_length=t.group_by_length)
    run.total_steps = t.max_steps or max(1, recipe.task.optimizer_steps(math.ceil(t.epochs * run.order.steps_per_epoch)))
    if recipe.task.learns_from_rollouts:
        run.rollouts = Rollouts(recipe.task, run.order, t.batch_size, recipe.seed)
    if t.forgetting_eval:
        run.general = general_rows(t.forgetting_eval, tokenizer, length)


def mixture_splits(recipe: Recipe, tokenizer, length: int,
                   chat: dict | None = None) -> dict[str, dict[str, list[Encoded]]]:
    """Each mixture source's train/validation/test splits, by its name, through its own task."""
    parts = {}
    for i, part in enumerate(recipe.data.mixture):
        own = recipe.task.to_dict() if part.task in ("", recipe.task.name) else {"name": part.task}
        if part.template:
            own["template"] = part.template
        task = task_from_dict(own, f"data.mixture[{i}].task")
        data = dataclasses.replace(recipe.data, source=part.source, mixture=[])
        parts[part.name or source_name(part.source)] = task.splits(data, recipe.data_seed, tokenizer, length, chat)
    return parts


def _set_up_backend(run: Run, plan: Plan) -> None:
    """The method performed, the training switches set, the processes joined (and the model sharded),
    then the optimizer's state made: after the processes meet, before any step."""
    t, backend = run.recipe.train, run.backend
    if t.memory_limit_gb:  # (its estimate was checked before the model loaded: train/loop.py)
        backend.set_memory_limit(int(t.memory_limit_gb * 2**30))
    backend.apply_method(plan)
    if t.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    if t.compile:
        backend.enable_compile()
    if run.world.size > 1:
        backend.join(run.world)
        if t.fsdp:
            backend.shard(run.world)
    if t.optimizer.paged and not backend.has_cuda:
        raise TwintuneError(f"optimizer {t.optimizer.name} keeps its state in CUDA's paged memory (bitsandbytes), and "
                            f"this {backend.name} run has no CUDA GPU (MLX's memory is unified already); use "
                            f"{t.optimizer.name.removeprefix('paged_')}.")
    backend.set_optimizer(t.optimizer, t.weight_decay)


def _loss_terms(run: Run, plan: Plan, tokenizer, length: int) -> list[LossTerm]:
    """The guards' terms beside the task's loss, in the order a step adds them (train/terms.py)."""
    t, terms = run.recipe.train, []
    if t.replay.fraction > 0:
        terms.append(Replay(general_rows(t.replay.source, tokenizer, length, REPLAY), t.replay.fraction,
                            run.order.examples_per_step, run.recipe.seed))
    if t.distill.weight > 0:
        terms.append(Distillation(general_rows(t.distill.source, tokenizer, length, DISTILL), t.distill,
                                  run.recipe.seed, run.backend, plan))
    if t.ewc.weight > 0:  # at the start's values, before any step (or resumed state)
        rows = general_rows(t.ewc.source, tokenizer, length, EWC)
        terms.append(ElasticWeights(run.backend, rows[: t.ewc.samples], t.ewc.weight))
    return terms
