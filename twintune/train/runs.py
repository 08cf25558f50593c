"""Finished runs reopened: evaluate them on a split, predict labels for new texts, merge their
adapter into the base, export it in another tool's format.

A target is a run directory (recipe.json + adapter/, as `twintune train` writes) or a recipe
file (the base model with the recipe's method at its initial values, i.e. before training).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twintune.backends import backend_class, resolve_backend_name
from twintune.errors import TwintuneError, TwintuneWarning
from twintune.formats.adapter import check_adapter_fits, check_adapter_method, load_adapter
from twintune.formats.adapter import base_reference
from twintune.formats.checkpoint import load_config, resolve_model_dir
from twintune.formats.merge import BASE_FILES, classifier_config, write_checkpoint
from twintune.formats.safetensors_io import write_json
from twintune.models import mlx_lm_has_family
from twintune.methods import BaseModel, Method
from twintune.models import GPTNeoSpec
from twintune.recipe import Recipe, load_recipe
from twintune.train.features import load_classifier
from twintune.formats.head import check_head_fits, read_head_labels
from twintune.tasks import HEAD, Report, split_head
from twintune.tasks.ppo import split_value_head
from twintune.train.build import Run, prepare, read_gpt_neo
from twintune.train.checkpoints import list_checkpoints
from twintune.train.evaluate import evaluate, evaluate_with_shots, labelled_texts, predict


def run_backend(run_dir: Path, asked: str | None) -> str | None:
    """The backend a run reopens on: the one asked for; else the one that trained it (summary.json's),
    when its framework is installed here; else the recipe's (None), with a warning naming why.

    Example:
        >>> run_backend(Path("runs/demo"), None), run_backend(Path("runs/demo"), "mlx")   # runs/demo: trained on torch
        ('torch', 'mlx')
    """
    if asked not in (None, "auto"):
        return asked
    trained = _trained_backend(Path(run_dir))
    if trained is None:
        return asked
    try:
        backend_class(trained)
    except TwintuneError as missing:
        warnings.warn(f"{run_dir} was trained on {trained}, which cannot run here ({missing}); it reopens on "
                      f"{resolve_backend_name('auto')}, with the same numbers.", TwintuneWarning, stacklevel=2)
        return asked
    return trained


def _trained_backend(run_dir: Path) -> str | None:
    """The backend summary.json names (None without one: a stopped run, refused by check_finished)."""
    try:
        trained = json.loads((run_dir / "summary.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return trained if trained in ("mlx", "torch") else None


def check_finished(run_dir: Path) -> None:
    """A run that stopped before it finished (SIGTERM, a crash) has checkpoints but no adapter yet:
    said so, with the command that continues it."""
    checkpoints = list_checkpoints(run_dir)
    if not (run_dir / "adapter").exists() and checkpoints:
        raise TwintuneError(f"{run_dir} has no adapter yet: the run stopped before it finished (its newest checkpoint "
                            f"is {checkpoints[-1].name}); continue it with twintune train --resume {run_dir}.")


def open_run(target: str | Path, backend: str | None = None, with_data: bool = True) -> Run:
    """A prepared run with a run directory's trained adapter loaded (or a recipe's initial values).

    Example:
        >>> run = open_run("runs/demo", backend="mlx")
        >>> 0 <= evaluate(run, "test").accuracy <= 1
        True
    """
    path = Path(target)
    if not path.exists():
        raise TwintuneError(f"{path} does not exist; give a run directory (from twintune train) or a recipe file.")
    if not path.is_dir():
        return prepare(load_recipe(path), backend, with_data)
    if not (path / "recipe.json").exists():
        raise TwintuneError(f"{path} is not a run directory: it has no recipe.json.")
    recipe = load_recipe(path / "recipe.json")
    if recipe.task.trains_in_steps:
        check_finished(path)
    backend = run_backend(path, backend)
    # the adapter holds the saved form of the method's values (P-tuning: its encoder's output)
    recipe = dataclasses.replace(recipe, method=recipe.method.saved_method())
    run = prepare(recipe, backend, with_data)
    if not recipe.task.trains_in_steps:  # a fitted classifier, not an adapter
        run.classifier = load_classifier(path / "classifier", run.encoder.prompt.labels, run.spec.hidden_size)
        return run
    method, state = read_run_adapter(path / "adapter", recipe, run.spec)
    check_adapter_fits(state, {k: v.shape for k, v in run.backend.trainable_state().items()}, method, path / "adapter")
    run.backend.set_trainable_state(state)
    return run


def read_run_adapter(directory: Path, recipe: Recipe, spec: GPTNeoSpec) -> tuple[Method, dict[str, np.ndarray]]:
    """A run's adapter, checked against the recipe that trained it: its method, and its head over the
    recipe's labels (or none)."""
    method, state = load_adapter(directory, spec)
    check_adapter_method(method, recipe.method, directory)
    check_head_fits(state, recipe.task.linear_head, recipe.task.head_labels(recipe) or [], directory)
    return method, state


@dataclass(frozen=True)
class Evaluation:
    """A run's report on a split, with what it was measured on: the JSON `twintune eval --json` prints
    (`to_dict`) and its readable table (`text`)."""

    report: Report
    split: str
    examples: int
    backend: str

    def to_dict(self) -> dict:
        return {**self.report.to_dict(predictions=False), "split": self.split, "examples": self.examples,
                "backend": self.backend}

    def text(self) -> str:
        return "\n".join(self.report.lines(self.split, self.examples, self.backend))


def evaluate_split(target: str | Path, split: str = "validation", backend: str | None = None,
                   shots: int | None = None, retrieve: bool = False) -> Evaluation:
    """A run's (or a recipe's untrained start's) report on a split; with `shots`, that many training
    sentences of each class go before every sentence (a recipe's untrained start with shots=0 is the
    zero-shot baseline); with `retrieve`, the ones nearest to each sentence (the report then has the
    random shots' report too, as `random_shots`).

    Example:
        >>> evaluation = evaluate_split("recipes/demo-financial-sentiment.yaml", "test", "torch", shots=4)
        >>> evaluation.report.shots, evaluation.text().startswith("test split, ")
        (4, True)
    """
    if split not in ("train", "validation", "test"):
        raise TwintuneError(f"split must be train, validation or test, got {split!r}.")
    if retrieve and shots is None:
        raise TwintuneError("--retrieve chooses the --shots sentences; give --shots K as well.")
    run = open_run(target, backend)
    if not run.splits.get(split):
        raise TwintuneError(f"the {split} split is empty; set data.{split}_fraction in the recipe.")
    report = evaluate(run, split) if shots is None else evaluate_with_shots(run, split, shots, retrieve)
    return Evaluation(report, split, len(run.splits[split]), run.backend.name)


def evaluate_target(target: str | Path, split: str = "validation", backend: str | None = None,
                    shots: int | None = None, retrieve: bool = False) -> dict:
    """`evaluate_split`'s evaluation as JSON values: accuracy, macro-F1, per-class precision/recall/F1
    and the confusion matrix (or loss and perplexity), with the split, its size and the backend.

    Example:
        >>> 0 <= evaluate_target("runs/demo", "test", backend="torch")["macro_f1"] <= 1
        True
        >>> evaluate_target("recipes/demo-financial-sentiment.yaml", "test", shots=4)["shots"]
        4
    """
    return evaluate_split(target, split, backend, shots, retrieve).to_dict()


def predict_texts(target: str | Path, texts: list[str], backend: str | None = None) -> list[dict]:
    """Label and class probabilities for each text (softmax over the label words' scores).

    Example:
        >>> predicted = predict_texts("runs/demo", ["Operating profit rose to EUR 13.1 mn ."], "torch")
        >>> predicted[0]["label"] in ("negative", "neutral", "positive")
        True
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TwintuneError("give at least one non-empty text to predict.")
    run = open_run(target, backend, with_data=False)
    if run.recipe.task.cannot_predict:
        raise TwintuneError(f"{target} is a {run.recipe.task.name} run: {run.recipe.task.cannot_predict}.")
    labels = run.encoder.prompt.labels
    encoded = [run.encoder.encode(text, labels[0], f" (text {i + 1})") for i, text in enumerate(texts)]
    return labelled_texts(texts, predict(run, encoded)[1], labels)


def run_and_new_output(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """A run directory and an output directory that is new or empty, or the sentence saying which is not."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if not (run_dir / "recipe.json").exists():
        raise TwintuneError(f"{run_dir} is not a run directory: it has no recipe.json.")
    if out.exists() and any(out.iterdir()):
        raise TwintuneError(f"output directory {out} is not empty; choose another --out (nothing was written).")
    return run_dir, out


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a run's trained values into its base and write a Hugging Face checkpoint in `out_dir`.

    A run trained on an NF4 base merges into that base dequantized (float32), the weights the
    adapter was trained against; re-quantizing would round the update away. A run trained in
    bfloat16 or float16 (`dtype`) merges into the float32 base as well.

    Example:
        >>> merge_run("runs/demo", "models/demo-merged")   # then GPTNeoForCausalLM.from_pretrained(...)
        PosixPath('models/demo-merged')
    """
    run_dir, out = run_and_new_output(run_dir, out_dir)
    recipe = load_recipe(run_dir / "recipe.json")
    if not recipe.task.trains_in_steps:
        raise TwintuneError(f"a {recipe.task.name} run cannot be merged: its classifier reads pooled features "
                            "(numpy), not a layer of the model; its result is classifier/ in the run directory.")
    quantization = recipe.quantization()
    if quantization and quantization.type == "affine":
        raise TwintuneError("merging a run trained on MLX's affine-quantized base is not supported; "
                            "train with quantize.type=nf4 or none to merge.")
    model_type = load_config(recipe.model).get("model_type")
    if model_type != "gpt_neo":
        raise TwintuneError(f"merge writes GPT-Neo checkpoints; this run's model is {model_type!r} "
                            "(an mlx-lm model): export the adapter with --format mlx-lm and fuse it with mlx-lm.")
    base, directory = read_gpt_neo(recipe)
    _, adapter = read_run_adapter(run_dir / "adapter", recipe, base.spec)
    adapter, _ = split_value_head(adapter)  # PPO's value head estimates values: the merged model generates
    adapter, head = split_head(adapter)
    # the recipe's method merges (or says why it cannot): a saved form (P-tuning's prompt) is not the method trained
    merged = recipe.method.merge(base, adapter)
    if head is None:
        return write_checkpoint(out, directory, merged)
    return write_checkpoint(out, directory, {**merged, HEAD: head}, labels=recipe.task.head_labels(recipe))


def export_run_adapter(run_dir: str | Path, fmt: str, out_dir: str | Path, quantize: str = "f16") -> Path:
    """A run's adapter in `fmt`: "peft" (PEFT's own files, naming its base so that
    `AutoPeftModelForCausalLM.from_pretrained(out_dir)` finds it from anywhere: a local base's absolute
    path, a hub id; the built-in model is carried along in out_dir/base-model), "mlx-lm" (for
    models of mlx-lm's families), or "gguf" (the merged model as one file for llama.cpp, `out_dir` its
    path, weights in `quantize`: f16, q8_0 or f32; llama-family models).

    Example:
        >>> export_run_adapter("runs/demo", "peft", "adapters/demo")
        PosixPath('adapters/demo')
    """
    if fmt in ("gguf", "gguf-lora"):
        return _export_gguf(Path(run_dir), Path(out_dir), quantize, adapter_only=fmt == "gguf-lora")
    run_dir, out = run_and_new_output(run_dir, out_dir)
    if fmt == "mlx-lm":
        return _export_mlx_lm(run_dir, out)
    if fmt != "peft":
        raise TwintuneError(f"export format {fmt!r} is unknown; choose peft, mlx-lm, gguf or gguf-lora.")
    recipe = load_recipe(run_dir / "recipe.json")
    if recipe.method.layout != "peft":
        raise TwintuneError(f"method {recipe.method.name} has no PEFT format (PEFT does not have it); its adapter is "
                            f"in {run_dir / 'adapter'}, in twintune's layout.")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run_dir / "adapter", out, dirs_exist_ok=True)
    base = base_reference(recipe.model)
    if recipe.model.startswith("builtin:"):  # a base PEFT can load where twintune is not installed: carried along
        labels = read_head_labels(out)  # a head's: the carried base is its classifier (id2label, padding)
        base = str(_copy_base(resolve_model_dir(recipe.model), out / "base-model", labels).resolve())
    config = json.loads((out / "adapter_config.json").read_text())
    write_json(out / "adapter_config.json", {**config, "base_model_name_or_path": base})
    return out


def _copy_base(model_dir: Path, out: Path, labels: list[str] | None) -> Path:
    """A Hugging Face model folder's files (weights, tokenizer, config: a classifier's over `labels`)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", *BASE_FILES):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    config = json.loads((model_dir / "config.json").read_text())
    write_json(out / "config.json", classifier_config(config, labels) if labels else config)
    return out


def _export_gguf(run_dir: Path, out: Path, quantize: str, adapter_only: bool = False) -> Path:
    """The run's merged model as a GGUF file, or (`adapter_only`) its LoRA adapter as llama.cpp's GGUF
    LoRA file (formats/gguf_export.py)."""
    from twintune.formats.gguf_export import LLAMA_FAMILY, QUANTIZATIONS, write_gguf, write_gguf_lora
    from twintune.formats.safetensors_io import read_safetensors

    if not (run_dir / "recipe.json").exists():
        raise TwintuneError(f"{run_dir} is not a run directory: it has no recipe.json.")
    try:
        importlib.import_module("gguf")
    except ImportError:
        raise TwintuneError("GGUF export writes with the gguf package, which is not installed: pip install "
                            "'twintune[gguf]'.") from None
    if out.exists():
        raise TwintuneError(f"{out} exists; choose another --out (nothing was written).")
    if quantize not in QUANTIZATIONS:
        raise TwintuneError(f"--quantize {quantize!r} is unknown; choose {', '.join(QUANTIZATIONS)}.")
    recipe = load_recipe(run_dir / "recipe.json")
    config = load_config(recipe.model)
    model_type = config.get("model_type")
    if model_type == "gpt_neo":
        raise TwintuneError("llama.cpp has no GPT-Neo architecture, so a GPT-Neo run cannot be a GGUF file; merge it "
                            "(twintune merge) for transformers, or train a llama-family model to export GGUF.")
    if model_type not in LLAMA_FAMILY or config.get("quantization"):
        raise TwintuneError(f"GGUF export writes unquantized llama-family models ({', '.join(LLAMA_FAMILY)}); this "
                            f"run's model is {model_type!r}{' (quantized)' if config.get('quantization') else ''}.")
    run = open_run(run_dir, "mlx", with_data=False)  # the adapter checked against the model, as for eval
    adapter, head = split_head(split_value_head(run.backend.trainable_state())[0])
    if head is not None:
        raise TwintuneError("this run trained a classification head, which llama.cpp's llama architecture has no "
                            "place for; export runs that generate text.")
    if adapter_only:
        # llama.cpp scales each layer by one alpha over the layer's rank (read from its tensors)
        method = recipe.method
        if method.name != "lora" or method.alpha_pattern or (method.rslora and method.rank_pattern):
            raise TwintuneError(f"a GGUF LoRA file scales every layer by one alpha over its rank; this run's method is "
                                f"{method.name}{' with per-layer alphas' if method.name == 'lora' else ''}: export the "
                                "merged model (--format gguf).")
        alpha = method.alpha * math.sqrt(method.r) if method.rslora else method.alpha  # rsLoRA's alpha / sqrt(r)
        return write_gguf_lora(out, adapter, config, recipe.name, alpha)
    model_dir = Path(run.model_dir)
    weights = {k: v for path in sorted(model_dir.glob("*.safetensors")) for k, v in read_safetensors(path).items()}
    merged = recipe.method.merge(BaseModel(run.spec, weights), adapter)
    return write_gguf(out, merged, config, model_dir, recipe.name, quantize, recipe.data.chat_template or None)


def _export_mlx_lm(run_dir: Path, out: Path) -> Path:
    from twintune.formats.mlx_lm_adapter import write_mlx_lm_adapter

    recipe = load_recipe(run_dir / "recipe.json")
    config = load_config(recipe.model)
    model_type = config.get("model_type")
    if not mlx_lm_has_family(model_type):
        raise TwintuneError(f"mlx-lm has no {model_type!r} model family, so it cannot load this run's adapter; "
                            f"{run_dir / 'adapter'} is a Hugging Face PEFT adapter (--format peft).")
    if not recipe.method.mlx_lm_format:
        raise TwintuneError(f"export to mlx-lm writes LoRA adapters; this run's method is {recipe.method.name}.")
    run = open_run(run_dir, "mlx", with_data=False)  # the adapter checked against the model, as for eval
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    return write_mlx_lm_adapter(out, split_value_head(run.backend.trainable_state())[0], run.method,
                                num_layers=int(layers))
