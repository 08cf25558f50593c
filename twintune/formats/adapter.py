"""Adapters in and out: Hugging Face PEFT layout (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.formats.checkpoint import read_torch_bin
from twintune.formats.safetensors_io import read_safetensors, write_atomically, write_safetensors
from twintune.methods import LoRA, adapted_layers
from twintune.models import GPTNeoSpec

PEFT_PREFIX = "base_model.model."


def save_lora_adapter(directory: str | Path, method: LoRA, state: dict[str, np.ndarray], base_model: str) -> Path:
    """Write a LoRA adapter that `peft.PeftModel.from_pretrained` can load.

    Example:
        >>> save_lora_adapter("runs/demo/adapter", recipe.method_spec(), backend.trainable_state(), "EleutherAI/gpt-neo-1.3B")
    """
    directory = Path(directory)
    targets = method.target_modules
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": method.r,
        "lora_alpha": method.alpha,
        "lora_dropout": method.dropout,
        "use_rslora": method.rslora,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    write_safetensors(directory / "adapter_model.safetensors",
                      {PEFT_PREFIX + name: value for name, value in state.items()}, metadata={"format": "pt"})
    write_json(directory / "adapter_config.json", config)
    return directory


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    text = json.dumps(data, indent=2)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


# --- Adapters in -------------------------------------------------------------------------------

_PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")  # what PEFT picks for gpt_neo when target_modules is unset
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # inits that leave the base weights as they are
# PEFT options that change what an adapter means (beyond plain LoRA on the listed layers):
# option -> (value that means "off", what the option is, for the message).
_UNSUPPORTED_OPTIONS = {
    "use_dora": (False, "DoRA"),
    "fan_in_fan_out": (False, "transposed (Conv1D-style) weights"),
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a bias on lora_B"),
    "modules_to_save": (None, "fully trained extra modules"),
    "rank_pattern": ({}, "per-layer ranks"),
    "alpha_pattern": ({}, "per-layer alphas"),
    "layers_to_transform": (None, "adapting only some blocks"),
    "exclude_modules": (None, "excluded modules"),
    "trainable_token_indices": (None, "trained token embeddings"),
    "layer_replication": (None, "replicated layers"),
    "target_parameters": (None, "adapted parameters"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "megatron_config": (None, "Megatron layers"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "velora_config": (None, "VeLoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
}


def _is_off(value, off) -> bool:
    """Whether an option is at its neutral value (null, or an empty list/dict, counts as unset)."""
    if value is None or (isinstance(value, (list, dict, str)) and not value):
        return True
    return type(value) is type(off) and value == off


def _lora_from_config(config: dict, where: Path) -> LoRA:
    """Our LoRA spec from a PEFT adapter_config.json dict, refusing what plain LoRA cannot express."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise TwintuneError(f"adapter {where} names no peft_type in adapter_config.json; twintune loads LoRA "
                            "adapters (peft_type 'LORA') only.")
    if peft_type != "LORA":
        raise TwintuneError(f"adapter {where} is a PEFT {peft_type!r} adapter; twintune loads LoRA adapters "
                            "(peft_type 'LORA') only.")
    for option, (off, meaning) in _UNSUPPORTED_OPTIONS.items():
        value = config.get(option, off)
        if not _is_off(value, off):
            raise TwintuneError(f"adapter {where} sets {option}={value!r} ({meaning}), which twintune does not "
                                f"support; only plain LoRA adapters load.")
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        raise TwintuneError(f"adapter {where} sets init_lora_weights={init!r}, which changes the base model's "
                            "weights; convert it to a plain LoRA adapter first (PEFT's "
                            "path_initial_model_for_weight_conversion).")

    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise TwintuneError(f"adapter {where} has rank r={r!r}; it must be a positive integer.")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise TwintuneError(f"adapter {where} has lora_alpha={alpha!r}; it must be a positive number.")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise TwintuneError(f"adapter {where} has lora_dropout={dropout!r}; it must be in [0, 1).")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise TwintuneError(f"adapter {where} has use_rslora={rslora!r}; it must be true or false.")

    targets = config.get("target_modules")
    if targets is None:
        targets = _PEFT_DEFAULT_TARGETS
    elif targets == "all-linear":
        targets = GPTNeoSpec.LINEAR_NAMES
    elif isinstance(targets, str):
        pass  # a regex, matched against the full layer name as PEFT does
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets = tuple(sorted(set(targets)))
    else:
        raise TwintuneError(f"adapter {where} has target_modules={targets!r}; it must be a list of module "
                            "names or one regex.")
    return LoRA(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=targets, rslora=rslora)


def _read_adapter_weights(directory: Path) -> dict[str, np.ndarray]:
    safetensors_path = directory / "adapter_model.safetensors"
    if safetensors_path.exists():
        return read_safetensors(safetensors_path)
    bin_path = directory / "adapter_model.bin"
    if bin_path.exists():
        return read_torch_bin(bin_path)
    raise TwintuneError(f"adapter directory {directory} has no adapter_model.safetensors (or adapter_model.bin).")


def _twintune_name(name: str) -> str | None:
    """`base_model.model.X.lora_A[.default].weight` -> `X.lora_A.weight`; None for a non-LoRA tensor."""
    name = name.removeprefix(PEFT_PREFIX)
    for part in ("lora_A", "lora_B"):
        for suffix in (f".{part}.weight", f".{part}.default.weight"):
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)] + f".{part}.weight"
    return None


def load_lora_adapter(directory: str | Path, spec: GPTNeoSpec) -> tuple[LoRA, dict[str, np.ndarray]]:
    """Read a Hugging Face PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for a model.

    Returns our LoRA spec (r, alpha, dropout, target modules, rsLoRA) and the adapter values named
    as the backends name them (`transformer.h.0.attn.attention.q_proj.lora_A.weight`, float32, float64 if saved so),
    checked against the model: every tensor must belong to a linear layer the model has, with its
    shape, every adapted layer needs its lora_A and lora_B, and the layers must be exactly those
    the config's target_modules select. An `adapter_model.bin` is read only through
    `torch.load(weights_only=True)`. Anything else is refused with a TwintuneError.

    Example:
        >>> method, state = load_lora_adapter("runs/demo/adapter", run.spec)
        >>> method.r, sorted(state)[0]
        (8, 'transformer.h.0.attn.attention.k_proj.lora_A.weight')
        >>> run.backend.set_trainable_state(state)   # a run prepared with the same method settings
    """
    directory = Path(directory)
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
    method = _lora_from_config(config, directory)

    layers = spec.linear_layers()
    state: dict[str, np.ndarray] = {}
    for name, array in _read_adapter_weights(directory).items():
        ours = _twintune_name(name)
        if ours is None:
            raise TwintuneError(f"adapter tensor {name!r} is not a LoRA lora_A/lora_B weight; twintune loads "
                                "plain LoRA adapters only.")
        layer, part = ours.rsplit(".lora_", 1)
        if layer not in layers:
            raise TwintuneError(f"adapter tensor {name!r} names layer {layer!r}, which this model does not have; "
                                "was the adapter trained on a different base model?")
        if ours in state:
            raise TwintuneError(f"adapter holds two tensors for {ours!r} under different names (e.g. with and "
                                "without '.default').")
        if not np.issubdtype(array.dtype, np.floating):
            raise TwintuneError(f"adapter tensor {name!r} has dtype {array.dtype}; LoRA weights must be "
                                "floating point.")
        out_features, in_features = layers[layer]
        expected = (method.r, in_features) if part == "A.weight" else (out_features, method.r)
        if tuple(array.shape) != expected:
            raise TwintuneError(f"adapter tensor {name!r} has shape {tuple(array.shape)} but layer {layer!r} of this "
                                f"model ({out_features}x{in_features}) with r={method.r} needs {expected}; the "
                                "adapter does not match this base model.")
        # float64 (a float64 run's adapter) stays float64; half precision is widened to float32
        state[ours] = np.ascontiguousarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)

    adapted = adapted_layers(state)
    for layer in adapted:
        for part in ("lora_A", "lora_B"):
            if f"{layer}.{part}.weight" not in state:
                raise TwintuneError(f"adapter has no {part} weight for layer {layer!r}; every adapted layer needs "
                                    "both lora_A and lora_B.")
    targets = method.targets(layers)
    missing = sorted(set(targets) - set(adapted))
    if missing:
        raise TwintuneError(f"adapter has no lora_A/lora_B weights for layer {missing[0]!r}, which its "
                            f"target_modules select ({len(missing)} such layers).")
    extra = sorted(set(adapted) - set(targets))
    if extra:
        raise TwintuneError(f"adapter has weights for layer {extra[0]!r}, which its target_modules "
                            f"{config.get('target_modules')!r} do not select.")
    return method, state


def run_and_new_output(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """A run directory and an output directory that is new or empty, or the sentence saying which is not."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if not (run_dir / "recipe.json").exists():
        raise TwintuneError(f"{run_dir} is not a run directory: it has no recipe.json.")
    if out.exists() and any(out.iterdir()):
        raise TwintuneError(f"output directory {out} is not empty; choose another --out (nothing was written).")
    return run_dir, out


def export_run_adapter(run_dir: str | Path, fmt: str, out_dir: str | Path) -> Path:
    """A run's adapter in `fmt`: "peft" (copied as saved), or "mlx-lm" (for models of mlx-lm's families).

    Example:
        >>> export_run_adapter("runs/demo", "peft", "adapters/demo")
        PosixPath('adapters/demo')
    """
    import shutil

    run_dir, out = run_and_new_output(run_dir, out_dir)
    if fmt == "mlx-lm":
        return _export_mlx_lm(run_dir, out)
    if fmt != "peft":
        raise TwintuneError(f"export format {fmt!r} is unknown; choose peft or mlx-lm.")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run_dir / "adapter", out, dirs_exist_ok=True)
    return out


def _export_mlx_lm(run_dir: Path, out: Path) -> Path:
    from twintune.formats.checkpoint import load_config
    from twintune.formats.mlx_lm_adapter import write_mlx_lm_adapter
    from twintune.models import mlx_lm_has_family
    from twintune.recipe import load_recipe
    from twintune.train.runs import open_run

    config = load_config(load_recipe(run_dir / "recipe.json").model)
    model_type = config.get("model_type")
    if not mlx_lm_has_family(model_type):
        raise TwintuneError(f"mlx-lm has no {model_type!r} model family, so it cannot load this run's adapter; "
                            f"{run_dir / 'adapter'} is a Hugging Face PEFT adapter (--format peft).")
    run = open_run(run_dir, "mlx", with_data=False)  # the adapter checked against the model, as for eval
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    return write_mlx_lm_adapter(out, run.backend.trainable_state(), run.method, num_layers=int(layers))
