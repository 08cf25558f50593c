"""A LoRA adapter in mlx-lm's format: `adapters.safetensors` + `adapter_config.json`, as `mlx_lm.tuner.utils.load_adapters` reads them.

mlx-lm stores lora_a as (in, r) and lora_b as (r, out), computes y + scale (x lora_a) lora_b, and
adapts the named modules of the last `num_layers` blocks. Our values are PEFT's (lora_A (r, in),
lora_B (out, r), the same scale), so the export transposes. mlx-lm has no GPT-Neo, so this is
for mlx-lm models trained through MLXBackend.from_model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.formats.safetensors_io import write_safetensors
from twintune.methods import LoRA, adapted_layers

_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def write_mlx_lm_adapter(out_dir: str | Path, adapter: dict[str, np.ndarray], method: LoRA, num_layers: int) -> Path:
    """Write `adapter` (PEFT-named LoRA values of an mlx-lm model) where mlx-lm's load_adapters reads it.

    mlx-lm then loads it onto the same model: `mlx_lm.tuner.utils.load_adapters(model, out_dir)`
    (tests/test_mlx_lm_models.py does, with the same logits).
    """
    weights, keys, blocks = {}, set(), set()
    for name in adapted_layers(adapter):
        match = _BLOCK.fullmatch(name)
        if not match:
            raise TwintuneError(f"adapted layer {name!r} is not inside an mlx-lm model's blocks (model.layers.N...); "
                                "mlx-lm's format covers models mlx-lm implements, and GPT-Neo is not one of them.")
        blocks.add(int(match.group(1)))
        keys.add(match.group(2))
        weights[f"{name}.lora_a"] = np.ascontiguousarray(adapter[f"{name}.lora_A.weight"].T, dtype=np.float32)
        weights[f"{name}.lora_b"] = np.ascontiguousarray(adapter[f"{name}.lora_B.weight"].T, dtype=np.float32)
    if not weights:
        raise TwintuneError("the adapter holds no LoRA values to export.")
    adapted_from = min(blocks)
    # mlx-lm adapts every key in each of the last num_layers blocks: that must be exactly our set
    expected = {(block, key) for block in range(adapted_from, num_layers) for key in keys}
    present = {(int(m.group(1)), m.group(2)) for m in map(_BLOCK.fullmatch, adapted_layers(adapter))}
    if present != expected:
        raise TwintuneError("mlx-lm's format adapts the same modules in each of the last blocks; this adapter's "
                            "layers do not form such a set.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapters.safetensors", weights)
    config = {"fine_tune_type": "lora", "num_layers": num_layers - adapted_from,
              "lora_parameters": {"rank": method.r, "scale": method.scale, "dropout": method.dropout,
                                  "keys": sorted(keys)}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
