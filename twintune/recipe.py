"""YAML recipes -> validated dataclasses. Unknown keys and bad values are refused by name.

A recipe is one YAML file (see recipes/); `--set train.lr=1e-3` style overrides are applied
before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from twintune.errors import TwintuneError
from twintune.keys import build, check
from twintune.methods import LoRA, Method, method_from_dict
from twintune.optimizers import Adafactor, AdamW, Optimizer, optimizer_from_dict
from twintune.quant import Quantization
from twintune.tasks import Classification, Task, task_from_dict

DEFAULT_LABELS = {"negative": " negative", "neutral": " neutral", "positive": " positive"}


@dataclass
class MixtureSource:
    """One source of `data.mixture`: sampled with probability weight / the weights' sum."""

    source: str = ""  # as data.source: a .jsonl / .txt / datasets source, or synthetic
    weight: float = 1.0
    task: str = ""  # causal_lm | instruction ("": the recipe's task, with its keys)
    template: str = ""  # instruction: this source's template ("": the task's)
    name: str = ""  # in per-source metrics ("": the file's stem)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | financial_phrasebank | hf:ORG/NAME | a .txt/.csv/.jsonl/.json/.parquet path
    subset: str = "sentences_allagree"  # financial_phrasebank's
    split: str = "train"  # hf:ORG/NAME's split (twintune makes its own validation and test splits from it)
    config: str = ""  # hf:ORG/NAME's configuration, if it has several
    synthetic_size: int = 1500
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_length: int = 256  # tokens, prompt and label word included
    seed: int | None = None  # the data's own seed (synthetic sentences, splits); null: the recipe's seed
    mixture: list[MixtureSource] = field(default_factory=list)  # several sources by weight (generative tasks)
    chat_template: str = ""  # Jinja, for chat rows (messages) where the tokenizer has none (GPT-Neo) or instead of its own


@dataclass
class PromptConfig:
    template: str = "Sentence: {text}\nSentiment:"
    labels: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LABELS))


@dataclass
class QuantizeConfig:
    type: str = "none"  # none | nf4 (both backends, bit-identical) | affine (MLX only)
    double_quant: bool = True  # nf4: quantize the block absmax values too (QLoRA)
    blocksize: int = 64  # nf4: values per absmax block
    bits: int = 4  # affine: 4 | 8
    group_size: int = 64  # affine: 32 | 64 | 128


DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class ReplayConfig:
    source: str = ""  # general text: a .txt / .jsonl / datasets source, or synthetic
    fraction: float = 0.0  # of each step's examples; 0: no replay


@dataclass
class DistillConfig:
    source: str = ""  # general text the model is held to the base model's predictions on, or synthetic
    weight: float = 0.0  # of the KL term; 0: no distillation
    temperature: float = 1.0
    rows: int = 4  # general-text rows per step


@dataclass
class EWCConfig:
    source: str = ""  # general text the Fisher information is estimated on, or synthetic
    weight: float = 0.0  # lambda; 0: no EWC
    samples: int = 32  # rows of the source the Fisher averages over


DEFAULT_LR = 2e-4
REPORTERS = ("tensorboard", "wandb")  # train.report_to (train/reporting.py)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    group_by_length: bool = False  # batches of similar-length sentences: less padding computed
    gradient_checkpointing: bool = False  # keep only each block's input; recompute the block in the backward
    compile: bool = False  # torch.compile / mx.compile the training step; the first steps of each shape compile
    fsdp: bool = False  # several torch processes: each keeps a shard of the weights, gradients and AdamW state (FSDP2)
    lr: float | None = None  # None: DEFAULT_LR (Adafactor's relative_step computes its own, and refuses one)
    weight_decay: float = 0.0  # every optimizer's (SGD's as torch's: added to the gradient)
    optimizer: Optimizer = field(default_factory=AdamW)  # {name: adamw | adamw8bit | lion | sgd | adafactor ..., its keys}
    warmup_steps: int = 0
    schedule: str = "linear"  # constant | linear | cosine
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int = 32
    save_every: int = 0  # steps between checkpoints (0: none); the last step is saved too
    keep_last: int = 2  # checkpoints kept
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0: off)
    early_stopping_metric: str = "val_accuracy"  # val_accuracy | val_macro_f1 (task causal_lm: val_loss | val_perplexity)
    forgetting_eval: str = ""  # general text whose perplexity the summary reports before and after training
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # general text replayed in every step
    ewc: EWCConfig = field(default_factory=EWCConfig)  # a pull of the trainable values back to their start
    distill: DistillConfig = field(default_factory=DistillConfig)  # KL to the base model on general text
    report_to: list[str] = field(default_factory=list)  # [tensorboard, wandb]: reporters beside metrics.jsonl
    log_every: int = 10  # steps between console lines (loss, lr, tokens/s, peak memory) and timing reports; 0: none
    memory_limit_gb: float | None = None  # refuse a run estimated above it; MLX's and CUDA's allocators held to it

    @property
    def base_lr(self) -> float:
        """The learning rate the schedule starts from: train.lr, or DEFAULT_LR where the recipe gives none."""
        return DEFAULT_LR if self.lr is None else self.lr


@dataclass
class Recipe:
    name: str = "run"
    model: str = "builtin:tiny-gpt-neo"
    backend: str = "auto"
    seed: int = 0
    dtype: str = "float32"  # the frozen model's; trainable values and optimizer state: float32 (float64 in float64)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    task: Task = field(default_factory=Classification)  # task: {name: classification | features, its keys}
    method: Method = field(default_factory=LoRA)  # method: {name: lora | dora | ia3 | ..., its keys}
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def method_spec(self) -> Method:
        return self.method

    @property
    def data_seed(self) -> int:
        """The seed of the data (the synthetic set and the splits): data.seed, else the recipe's seed.
        `twintune compare` varies the recipe's seed over one fixed data set this way."""
        return self.seed if self.data.seed is None else self.data.seed

    def quantization(self) -> Quantization | None:
        q = self.quantize
        if q.type == "none":
            return None
        return Quantization(q.type, double_quant=q.double_quant, blocksize=q.blocksize, bits=q.bits,
                            group_size=q.group_size)

    def to_dict(self) -> dict:
        """Plain values (JSON-ready): what recipe.json holds and what a resume compares."""
        def plain(value):
            if isinstance(value, (Method, Task, Optimizer)):
                return value.to_dict()
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, (list, tuple)):  # data.mixture's sources
                return [plain(item) for item in value]
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, and validate every key and value.

    Example:
        >>> r = load_recipe("recipes/demo-financial-sentiment.yaml", ["train.lr=1e-3"])
        >>> r.train.lr
        0.001
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise TwintuneError(f"recipe file {path} does not exist.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TwintuneError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
        if not isinstance(raw, dict):
            raise TwintuneError(f"recipe {path} must be a mapping of keys to values.")
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict) -> Recipe:
    """A validated recipe from plain values (a YAML file's, or a run's recipe.json)."""
    if isinstance(raw, dict) and not task_from_dict(raw.get("task")).trains_method and "method" not in raw:
        raw = {**raw, "method": {"name": "none"}}  # the features task trains no method
    raw = _adam_keys_into_the_optimizer(raw)
    recipe = build(Recipe, raw, "", {Method: method_from_dict, Task: task_from_dict, Optimizer: optimizer_from_dict})
    validate(recipe)
    return recipe


def _adam_keys_into_the_optimizer(raw) -> dict:
    """train.betas and train.eps, AdamW's keys before the optimizer could be chosen (and in the recipe.json
    of runs from then), read as train.optimizer's betas and eps: at their defaults they are dropped; else
    they move into the optimizer where it is of the Adam family, and are refused where it is not."""
    train = raw.get("train") if isinstance(raw, dict) else None
    if not isinstance(train, dict) or not ({"betas", "eps"} & set(train)):
        return raw
    train = dict(train)
    optimizer = train.get("optimizer") or {}
    optimizer = dict(optimizer) if isinstance(optimizer, dict) else {"name": optimizer}
    name = optimizer.get("name", "adamw")
    for key, default in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
        if key not in train:
            continue
        value = train.pop(key)
        if value == default or (isinstance(value, (list, tuple)) and list(value) == default):
            continue
        if not name.startswith(("adamw", "paged_adamw")):
            raise TwintuneError(f"recipe key 'train.{key}' is AdamW's; optimizer {name} takes its keys in "
                                f"train.optimizer (train.optimizer.{key} where it has one).")
        if key in optimizer and optimizer[key] != value:
            raise TwintuneError(f"recipe keys 'train.{key}' and 'train.optimizer.{key}' disagree; keep "
                                f"train.optimizer.{key} only.")
        optimizer[key] = value
    if optimizer:
        train["optimizer"] = optimizer
    return {**raw, "train": train}


def apply_override(raw: dict, item: str) -> None:
    """Set a dotted key from `key=value` (the value is parsed as YAML: numbers, lists, booleans)."""
    if "=" not in item:
        raise TwintuneError(f"override {item!r} must look like key=value, e.g. train.lr=1e-3.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TwintuneError(f"override {key!r}: {part!r} is not a section.")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


_check = check


def validate_mixture(r: Recipe) -> None:
    """A mixture mixes generative tasks, each source named once, with some positive weight."""
    from twintune.data.mixture import source_name

    from twintune.tasks import TASKS

    mixable = [name for name, task in TASKS.items() if task.mixes]
    names = []
    for i, part in enumerate(r.data.mixture):
        where = f"data.mixture[{i}]"
        _check(bool(part.source), f"recipe key '{where}.source' is missing: name the source's file or dataset.")
        _check(part.weight >= 0, f"recipe key '{where}.weight' must be >= 0, got {part.weight}.")
        task = part.task or r.task.name
        _check(task in mixable, f"recipe key '{where}.task' must be {' or '.join(mixable)}, got {part.task!r}.")
        templated = [name for name in mixable if "template" in {f.name for f in dataclasses.fields(TASKS[name])}]
        _check(not part.template or task in templated, f"recipe key '{where}.template' belongs to "
                                                       f"{' and '.join(templated)} sources; this source's task is {task}.")
        names.append(part.name or source_name(part.source))
    _check(sum(part.weight for part in r.data.mixture) > 0,
           "data.mixture has no positive weight: give at least one source a weight above 0.")
    for name in names:
        _check(names.count(name) == 1, f"data.mixture names {name!r} twice; give the sources distinct `name`s.")


def check_trains_something(r: Recipe) -> None:
    """Training needs something to train (the task says what). Loading such a recipe is fine: `twintune
    eval` and `twintune compare`'s prompting rows evaluate the untrained model with method none."""
    r.task.check_trains_something(r)


def check_optimizer(r: Recipe) -> None:
    """What an optimizer cannot do with the rest of the recipe, refused by a sentence."""
    o, t = r.train.optimizer, r.train
    _check(not (o.eight_bit and r.dtype == "float64"),
           f"optimizer {o.name} keeps 8-bit state, which a float64 run (the parity proof) has no use for; use "
           f"{o.name.replace('8bit', '')} with dtype float64, or {o.name} with float32 or bfloat16.")
    _check(not (isinstance(o, Adafactor) and o.relative_step and t.lr is not None),
           f"recipe key 'train.lr' ({t.lr}) is unused: Adafactor's relative_step computes its own step size "
           "(transformers refuses both); drop train.lr, or set train.optimizer.relative_step: false to use it.")
    _check(not (t.fsdp and (o.eight_bit or not o.elementwise)),
           f"optimizer {o.name} keeps state over whole tensors ({'blocks of 256 values' if o.eight_bit else 'row and column means'}), "
           "which FSDP would cut at its shards' edges; use adamw, lion or sgd with train.fsdp, or run without it.")


def validate(r: Recipe) -> None:
    """Range checks that types alone cannot express."""
    from twintune.backends import BACKENDS

    _check(r.backend in BACKENDS, f"recipe key 'backend' must be one of {', '.join(BACKENDS)}, got {r.backend!r}.")
    _check(r.dtype in DTYPES, f"recipe key 'dtype' must be one of {', '.join(DTYPES)}, got {r.dtype!r}.")
    _check(r.seed >= 0, f"recipe key 'seed' must be >= 0, got {r.seed}.")
    d = r.data
    _check(d.synthetic_size >= 30, f"recipe key 'data.synthetic_size' must be at least 30, got {d.synthetic_size}.")
    _check(0 < d.validation_fraction < 1, f"recipe key 'data.validation_fraction' must be between 0 and 1, got {d.validation_fraction}.")
    _check(0 <= d.test_fraction < 1, f"recipe key 'data.test_fraction' must be between 0 and 1, got {d.test_fraction}.")
    _check(d.validation_fraction + d.test_fraction < 1, "data.validation_fraction + data.test_fraction must leave examples to train on.")
    _check(d.max_length >= 2, f"recipe key 'data.max_length' must be at least 2, got {d.max_length}.")
    _check(len(r.prompt.labels) >= 2, "recipe key 'prompt.labels' must name at least two labels.")
    r.task.check_recipe(r)
    if d.mixture:
        validate_mixture(r)
    q = r.quantize
    _check(q.type in ("none", "nf4", "affine"), f"recipe key 'quantize.type' must be none, nf4 or affine, got {q.type!r}.")
    _check(q.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096),
           f"recipe key 'quantize.blocksize' must be a power of two from 32 to 4096 (bitsandbytes' sizes), got {q.blocksize}.")
    _check(q.bits in (4, 8), f"recipe key 'quantize.bits' must be 4 or 8 (affine), got {q.bits}.")
    _check(q.group_size in (32, 64, 128), f"recipe key 'quantize.group_size' must be 32, 64 or 128 (affine), got {q.group_size}.")
    t = r.train
    _check(t.epochs > 0 or t.max_steps > 0, "recipe must train for something: set train.epochs > 0 or train.max_steps > 0.")
    _check(t.max_steps >= 0, f"recipe key 'train.max_steps' must be >= 0, got {t.max_steps}.")
    _check(t.batch_size > 0, f"recipe key 'train.batch_size' must be positive, got {t.batch_size}.")
    _check(t.grad_accum > 0, f"recipe key 'train.grad_accum' must be positive, got {t.grad_accum}.")
    _check(t.lr is None or t.lr > 0, f"recipe key 'train.lr' must be positive, got {t.lr}.")
    _check(t.weight_decay >= 0, f"recipe key 'train.weight_decay' must be >= 0, got {t.weight_decay}.")
    check_optimizer(r)
    _check(t.warmup_steps >= 0, f"recipe key 'train.warmup_steps' must be >= 0, got {t.warmup_steps}.")
    _check(t.schedule in ("constant", "linear", "cosine"), f"recipe key 'train.schedule' must be constant, linear or cosine, got {t.schedule!r}.")
    _check(t.max_grad_norm >= 0, f"recipe key 'train.max_grad_norm' must be >= 0, got {t.max_grad_norm}.")
    _check(t.eval_every >= 0, f"recipe key 'train.eval_every' must be >= 0, got {t.eval_every}.")
    _check(t.eval_batch_size > 0, f"recipe key 'train.eval_batch_size' must be positive, got {t.eval_batch_size}.")
    _check(t.save_every >= 0, f"recipe key 'train.save_every' must be >= 0, got {t.save_every}.")
    _check(t.log_every >= 0, f"recipe key 'train.log_every' must be >= 0, got {t.log_every}.")
    _check(t.memory_limit_gb is None or t.memory_limit_gb > 0,
           f"recipe key 'train.memory_limit_gb' must be positive (or null: no limit), got {t.memory_limit_gb}.")
    check_report_to(t.report_to)
    _check(t.keep_last >= 1, f"recipe key 'train.keep_last' must be at least 1, got {t.keep_last}.")
    _check(t.early_stopping_patience >= 0, f"recipe key 'train.early_stopping_patience' must be >= 0, got {t.early_stopping_patience}.")
    metrics = r.task.metrics
    _check(t.early_stopping_metric in metrics or not t.early_stopping_patience,
           f"recipe key 'train.early_stopping_metric' must be {' or '.join(metrics)} for task {r.task.name}, "
           f"got {t.early_stopping_metric!r}.")
    _check(0 <= t.replay.fraction < 1, f"recipe key 'train.replay.fraction' must be at least 0 and below 1 (the share "
                                       f"of each step's examples), got {t.replay.fraction}.")
    _check(not t.replay.fraction or t.replay.source, "train.replay needs a source of general text (train.replay.source: "
                                                     "a .txt, .jsonl or datasets source, or synthetic).")
    _check(t.ewc.weight >= 0, f"recipe key 'train.ewc.weight' must be >= 0, got {t.ewc.weight}.")
    _check(t.ewc.samples >= 1, f"recipe key 'train.ewc.samples' must be at least 1, got {t.ewc.samples}.")
    _check(not t.ewc.weight or t.ewc.source, "train.ewc needs a source of general text to estimate the Fisher "
                                             "information on (train.ewc.source: a .txt, .jsonl or datasets source, "
                                             "or synthetic).")
    _check(t.distill.weight >= 0, f"recipe key 'train.distill.weight' must be >= 0, got {t.distill.weight}.")
    _check(t.distill.temperature > 0, f"recipe key 'train.distill.temperature' must be positive, got {t.distill.temperature}.")
    _check(t.distill.rows >= 1, f"recipe key 'train.distill.rows' must be at least 1, got {t.distill.rows}.")
    _check(not t.distill.weight or t.distill.source, "train.distill needs a source of general text (train.distill.source: "
                                                     "a .txt, .jsonl or datasets source, or synthetic).")
    _check(not (t.replay.fraction and t.replay.source == t.forgetting_eval != "synthetic"),
           f"train.forgetting_eval measures forgetting on held-out text, but {t.forgetting_eval} is also "
           "train.replay.source, which training reads; name another source for one of them.")
    if t.fsdp:
        _check(r.method.name == "full", f"train.fsdp shards full fine-tuning's weights, gradients and optimizer "
                                        f"state; method {r.method.name}'s trainable values are small enough to keep "
                                        "whole on every process: remove train.fsdp.")
        for key, used in (("train.distill", t.distill.weight > 0), ("train.ewc", t.ewc.weight > 0),
                          ("train.compile", t.compile)):
            _check(not used, f"train.fsdp does not combine with {key}; remove one of them.")
    _check(not t.early_stopping_patience or t.eval_every > 0,
           "train.early_stopping_patience needs train.eval_every > 0 (it counts evaluations).")


def check_report_to(names: list[str]) -> None:
    """Refuse an unknown reporter, or one named twice, by a sentence (did you mean)."""
    for name in names:
        if name not in REPORTERS:
            close = difflib.get_close_matches(name, REPORTERS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it must be among {', '.join(REPORTERS)}."
            raise TwintuneError(f"recipe key 'train.report_to' names {name!r}, which is no reporter{hint}")
    if len(set(names)) < len(names):
        raise TwintuneError(f"recipe key 'train.report_to' names a reporter twice: {names}.")
