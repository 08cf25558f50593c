"""Adapters out: Hugging Face PEFT layout (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twintune.formats.safetensors_io import write_atomically, write_safetensors
from twintune.methods import LoRA

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
