"""Adapters in and out, for every method, in the method's layout:

- "peft" (every method PEFT has: LoRA, DoRA, IA3, the prompt-learning methods, ...): what
  `peft.PeftModel.from_pretrained` reads, adapter_config.json + adapter_model.safetensors with
  `base_model.model.` names (prompt-learning methods: one `prompt_embeddings`, `Method.file_names`);
- "twintune" (BitFit, last blocks, bottleneck adapters, LoReFT): adapter_config.json naming the method and its keys
  (`twintune_method`) + adapter_model.safetensors holding the trained tensors under the base's names;
- "checkpoint" (full fine-tuning): a whole Hugging Face checkpoint (config.json, model.safetensors,
  tokenizer files) that transformers loads, with the same adapter_config.json beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.formats.checkpoint import read_torch_bin
from twintune.formats.head import HEAD_FILE_NAMES, head_file_name, write_head_config
from twintune.formats.safetensors_io import read_safetensors, write_json, write_safetensors
from twintune.methods import METHODS, BaseModel, Method, method_from_dict
from twintune.models import GPTNeoSpec
from twintune.tasks.classification import HEAD, split_head
from twintune.tasks.ppo import VALUE_HEAD, VALUE_HEAD_FILE, split_value_head

PEFT_PREFIX = "base_model.model."
SEQ_CLS_MODULES = {"score", "classifier", "pre_classifier"}  # what PEFT's SEQ_CLS lists in modules_to_save


def save_adapter(directory: str | Path, method: Method, state: dict[str, np.ndarray], base_model_name: str,
                 model_dir: str | Path | None = None, labels: list[str] | None = None,
                 spec: GPTNeoSpec | None = None) -> Path:
    """Write a method's trained values in its layout (a "checkpoint" layout needs the base's `model_dir`
    for config.json and the tokenizer). A classification head in `state` (tasks.HEAD) is saved with
    them, under PEFT's SEQ_CLS name in a PEFT layout, and `labels` name its rows (head_config.json).
    A method with frozen tensors of its own (Method.frozen_values) needs the model's `spec` for them.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch", with_data=False)
        >>> save_adapter("runs/saved/adapter", run.method, run.backend.trainable_state(), "builtin:tiny-gpt-neo")
        PosixPath('runs/saved/adapter')
    """
    directory = Path(directory)
    prefix = PEFT_PREFIX if method.layout == "peft" else ""
    state, value_head = split_value_head(state)
    state, head = split_head(state)
    state = method.saved_values(state)
    if head is not None and labels is None:
        raise ValueError("a classification head is saved with the labels its rows score")
    if method.layout == "checkpoint":
        from twintune.formats.merge import write_checkpoint

        write_checkpoint(directory, model_dir, state if head is None else {**state, HEAD: head}, labels=labels)
    else:
        frozen = method.frozen_values(spec)
        tensors = {method.file_names.get(k, prefix + k): v for k, v in {**state, **frozen}.items()}
        if head is not None:
            tensors[head_file_name(method.layout, prompt_learning=bool(method.file_names))] = head
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    config = method.adapter_config(base_reference(base_model_name))
    if config.get("layers_pattern"):  # the model's own block list: GPT-Neo's `h`, mlx-lm llama's `layers`
        config["layers_pattern"] = spec.blocks if spec is not None else "h"
    if value_head:  # PPO's, beside the method's own files (which PEFT, merge and generate read alone)
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / VALUE_HEAD_FILE, {TRL_VALUE_HEAD[k]: v for k, v in value_head.items()},
                          metadata={"format": "pt"})
    if head is not None:
        write_head_config(directory, labels)
        if method.layout == "peft":  # PEFT's own SEQ_CLS adapter: the head is its `score` module to save
            config.update(task_type="SEQ_CLS", modules_to_save=["score"])
    write_json(directory / "adapter_config.json", config)
    return directory


# --- Adapters in -------------------------------------------------------------------------------

def read_adapter_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise TwintuneError(f"adapter directory {directory} does not exist.")
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise TwintuneError(f"adapter directory {directory} has no adapter_config.json.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TwintuneError(f"{config_path} is not valid JSON ({e}).") from None
    except OSError as e:
        raise TwintuneError(f"{config_path} could not be read ({e.strerror or type(e).__name__}).") from None
    if not isinstance(config, dict):
        raise TwintuneError(f"{config_path} must hold a JSON object of adapter settings.")
    return config


def method_of_adapter(config: dict, where: Path) -> Method:
    """The method an adapter_config.json describes: twintune's own layouts name it, PEFT's by peft_type."""
    if "twintune_method" in config:
        name = config["twintune_method"]
        if name not in METHODS:
            raise TwintuneError(f"adapter {where} was saved by method {name!r}, which this twintune does not have.")
        keys = {k: v for k, v in config.items() if k not in ("twintune_method", "name", "base_model_name_or_path")}
        return method_from_dict({"name": name, **keys}, where=f"{where / 'adapter_config.json'}: method")
    config = _without_head(config)
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise TwintuneError(f"adapter {where} names no peft_type in adapter_config.json; twintune loads PEFT "
                            f"adapters of type {', '.join(_peft_types())} and its own.")
    for cls in METHODS.values():
        if cls.reads_adapter_config(config):
            return cls.from_adapter_config(config, where)
    raise TwintuneError(f"adapter {where} is a PEFT {peft_type!r} adapter; twintune loads PEFT adapters of type "
                        f"{', '.join(_peft_types())}.")


def _without_head(config: dict) -> dict:
    """A PEFT SEQ_CLS adapter's config as its method reads it: the `score` module it saves (PEFT lists
    `classifier` too, and from 0.22 `pre_classifier`, for other models' heads) is the classification
    head, which load_adapter reads apart."""
    if config.get("task_type") == "SEQ_CLS" and set(config.get("modules_to_save") or ()) <= SEQ_CLS_MODULES:
        return {**config, "task_type": "CAUSAL_LM", "modules_to_save": None}
    return config


def _peft_types() -> list[str]:
    return sorted({cls.peft_type for cls in METHODS.values() if cls.peft_type})


def _read_adapter_weights(directory: Path, method: Method) -> dict[str, np.ndarray]:
    if method.layout == "checkpoint":
        if not (directory / "model.safetensors").exists():
            raise TwintuneError(f"adapter directory {directory} has no model.safetensors (a full fine-tuning result).")
        return read_safetensors(directory / "model.safetensors")
    safetensors_path = directory / "adapter_model.safetensors"
    if safetensors_path.exists():
        return read_safetensors(safetensors_path)
    bin_path = directory / "adapter_model.bin"
    if bin_path.exists():
        return read_torch_bin(bin_path)
    raise TwintuneError(f"adapter directory {directory} has no adapter_model.safetensors (or adapter_model.bin).")


def base_reference(model: str) -> str:
    """What an adapter names as its base (`base_model_name_or_path`), so that PEFT finds it from any
    working directory: a built-in model's or a local model's absolute path; a hub id as it is.

    Example:
        >>> base_reference("EleutherAI/gpt-neo-1.3B"), Path(base_reference("builtin:tiny-gpt-neo")).is_absolute()
        ('EleutherAI/gpt-neo-1.3B', True)
    """
    if model.startswith("builtin:"):
        from twintune.formats.tiny_model import builtin_model_dir

        return str(builtin_model_dir(model.removeprefix("builtin:")))
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _check_blocks(config: dict, spec, where: Path) -> None:
    """PEFT's layers_pattern names the model's block list (GPT-Neo's `h`, a llama's `layers`)."""
    pattern = config.get("layers_pattern")
    pattern = pattern[0] if isinstance(pattern, list) and len(pattern) == 1 else pattern
    if pattern not in (None, spec.blocks):
        raise TwintuneError(f"adapter {where} has layers_pattern={config['layers_pattern']!r}, but this model's blocks "
                            f"are {spec.blocks!r}; it was made for another model family.")


def our_name(name: str) -> str:
    """A saved tensor's name as the backends name it: no `base_model.model.` prefix, no PEFT adapter
    name (`.default`), and DoRA's magnitude without the `.weight` PEFT keeps in memory."""
    name = name.removeprefix(PEFT_PREFIX).replace(".default.", ".").removesuffix(".default")
    return name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")


def load_adapter(directory: str | Path, spec: GPTNeoSpec) -> tuple[Method, dict[str, np.ndarray]]:
    """Read an adapter of any method (twintune's or PEFT's) for a model: the method with its settings
    (as saved: `Method.saved_method`), and the trained values named as the backends name them
    (float32; float64 if saved so).

    Every tensor is checked against the model: it must be one the method's settings give this
    model, with its shape, and none may be missing. An `adapter_model.bin` is read only through
    `torch.load(weights_only=True)`. Anything else is refused with a TwintuneError.

    Example:
        >>> from twintune.formats.checkpoint import load_checkpoint
        >>> spec = GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)
        >>> method, state = load_adapter("runs/demo/adapter", spec)
        >>> method.name, sorted(state)[0]
        ('lora', 'transformer.h.0.attn.attention.k_proj.lora_A.weight')
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    method = method_of_adapter(config, directory).saved_method()
    _check_blocks(config, spec, directory)
    expected = method.shapes(BaseModel(spec, {}))
    from_file = {file: ours for ours, file in method.file_names.items()}
    layers = spec.linear_layers()
    state: dict[str, np.ndarray] = {}
    frozen = method.frozen_values(spec)
    for name, array in _read_adapter_weights(directory, method).items():
        if from_file.get(name) in frozen:  # drawn from the adapter's own keys: it must be what they give
            _check_frozen(name, array, frozen[from_file[name]], method)
            continue
        if name in HEAD_FILE_NAMES:
            state[HEAD] = _checked_head(name, array, spec)
            continue
        ours = from_file.get(name) or our_name(name)
        if method.layout == "checkpoint":
            ours = ours if ours.startswith("transformer.") else f"transformer.{ours}"
            if ours == "transformer.lm_head.weight" or ours.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # tied to wte / transformers' mask buffers
        layer, part = method.split_name(ours)
        if part is None:
            raise TwintuneError(f"adapter tensor {name!r} is not a {method.weight_kinds} weight; twintune loads "
                                f"{method.name} adapters with those tensors only.")
        if layer and layer not in layers and not any(k.startswith(layer + ".") for k in expected):
            raise TwintuneError(f"adapter tensor {name!r} names layer {layer!r}, which this model does not have; "
                                "was the adapter trained on a different base model?")
        if ours not in expected:
            raise TwintuneError(f"adapter has weights for layer {layer!r}, which its {method.selection} do not select.")
        if ours in state:
            raise TwintuneError(f"adapter holds two tensors for {ours!r} under different names (e.g. with and "
                                "without '.default').")
        if not np.issubdtype(array.dtype, np.floating):
            raise TwintuneError(f"adapter tensor {name!r} has dtype {array.dtype}; {method.title} weights must be "
                                "floating point.")
        if tuple(array.shape) != tuple(expected[ours]):
            size = f" ({layers[layer][0]}x{layers[layer][1]})" if layer in layers else ""
            raise TwintuneError(f"adapter tensor {name!r} has shape {tuple(array.shape)} but layer {layer!r} of this "
                                f"model{size}{method.layer_detail(layer)} needs {tuple(expected[ours])}; the adapter "
                                "does not match this base model.")
        # float64 (a float64 run's adapter) stays float64; half precision is widened to float32
        state[ours] = np.ascontiguousarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)
    missing = [k for k in expected if k not in state and k != HEAD]
    if missing:
        raise TwintuneError(method.missing_message(missing, state))
    if (directory / VALUE_HEAD_FILE).is_file():
        state.update(_read_value_head(directory / VALUE_HEAD_FILE, spec))
    return method, state


TRL_VALUE_HEAD = dict(zip(VALUE_HEAD, ("v_head.summary.weight", "v_head.summary.bias")))  # TRL's ValueHead names


def _read_value_head(path: Path, spec: GPTNeoSpec) -> dict[str, np.ndarray]:
    """A PPO run's value head (TRL's v_head.summary names): (1, width) and (1,), floating point."""
    saved = read_safetensors(path)
    shapes = {VALUE_HEAD[0]: (1, spec.hidden_size), VALUE_HEAD[1]: (1,)}
    state = {}
    for ours, name in TRL_VALUE_HEAD.items():
        array = saved.get(name)
        if array is None or tuple(array.shape) != shapes[ours] or not np.issubdtype(array.dtype, np.floating):
            raise TwintuneError(f"{path} must hold {name} of shape {shapes[ours]} (floating point) for this model; it "
                                f"holds {', '.join(f'{k} {tuple(v.shape)}' for k, v in saved.items()) or 'nothing'}.")
        state[ours] = np.ascontiguousarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)
    return state


def _check_frozen(name: str, array: np.ndarray, expected: np.ndarray, method: Method) -> None:
    """A saved frozen tensor (shared random projections) equals the one the adapter's settings draw."""
    if tuple(array.shape) != expected.shape or not np.array_equal(np.asarray(array, expected.dtype), expected):
        raise TwintuneError(f"adapter tensor {name!r} is not the one its {method.title} settings draw "
                            f"(shape {tuple(array.shape)}, expected {expected.shape} of the same values): it was "
                            "made another way, and twintune cannot compute with it.")


def _checked_head(name: str, array: np.ndarray, spec: GPTNeoSpec) -> np.ndarray:
    """A saved classification head: (labels, the model's width), floating point."""
    if not np.issubdtype(array.dtype, np.floating):
        raise TwintuneError(f"adapter tensor {name!r} (the classification head) has dtype {array.dtype}; it must be "
                            "floating point.")
    if array.ndim != 2 or array.shape[1] != spec.hidden_size or array.shape[0] < 1:
        raise TwintuneError(f"adapter tensor {name!r} (the classification head) has shape {tuple(array.shape)}, but "
                            f"this model's head must be (labels, {spec.hidden_size}); the "
                            "adapter does not match this base model.")
    return np.ascontiguousarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)


# --- Does an adapter fit? (one wording for every entrance: training's resume, eval, api.load, merge) ---

def check_adapter_method(method: Method, trained: Method, where: Path) -> None:
    """An adapter goes with the run whose recipe trained its method (P-tuning saves its prompt: the
    saved form of the method counts)."""
    if method.name != trained.saved_method().name:
        raise TwintuneError(f"the adapter in {where} is a {method.name} adapter, but the run's recipe trains "
                            f"method {trained.name}.")


def check_adapter_fits(state: dict[str, np.ndarray], expected: dict[str, tuple], method: Method, where: Path) -> None:
    """An adapter fits a model only with exactly the tensors, of the shapes, its method makes of it."""
    if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(expected[k]) for k in state):
        raise TwintuneError(f"the adapter in {where} does not fit this model: its tensors are not the ones "
                            f"{method.name} with its settings makes of it (different target modules, rank or blocks, "
                            "or another base model).")
