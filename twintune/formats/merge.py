"""Fold a run's LoRA adapter into its base and write a Hugging Face checkpoint transformers loads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from twintune.errors import TwintuneError
from twintune.formats.adapter import load_lora_adapter, run_and_new_output
from twintune.formats.checkpoint import load_config, load_checkpoint
from twintune.formats.safetensors_io import write_safetensors
from twintune.models import GPTNeoSpec, gpt_neo_weights
from twintune.quant import quantize_linear_layers
from twintune.recipe import load_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + scale * B A as config.json + model.safetensors + tokenizer files in `out_dir`.

    A run trained on an NF4 base merges into that base dequantized (float32), the weights the
    adapter was trained against; re-quantizing would round the update away. A run trained in
    bfloat16 or float16 (`dtype`) merges into the float32 base as well.

    Example:
        >>> merge_run("runs/demo", "models/demo-merged")   # then GPTNeoForCausalLM.from_pretrained(...)
        PosixPath('models/demo-merged')
    """
    run_dir, out = run_and_new_output(run_dir, out_dir)
    recipe = load_recipe(run_dir / "recipe.json")
    quantization = recipe.quantization()
    if quantization and quantization.kind == "affine":
        raise TwintuneError("merging a run trained on MLX's affine-quantized base is not supported; "
                            "train with quantize.type=nf4 or none to merge.")
    model_type = load_config(recipe.model).get("model_type")
    if model_type != "gpt_neo":
        raise TwintuneError(f"merge writes GPT-Neo checkpoints; this run's model is {model_type!r} "
                            "(an mlx-lm model): export the adapter with --format mlx-lm and fuse it with mlx-lm.")
    checkpoint = load_checkpoint(recipe.model)
    spec = GPTNeoSpec.from_config(checkpoint.config)
    weights = gpt_neo_weights(spec, checkpoint.weights)
    method, adapter = load_lora_adapter(run_dir / "adapter", spec)
    quantized = quantize_linear_layers(weights, list(spec.linear_layers()), quantization) if quantization else {}
    merged = method.merge(weights, adapter, quantized)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        config = dict(checkpoint.config, architectures=["GPTNeoForCausalLM"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(tmp / "model.safetensors", merged, metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (Path(checkpoint.directory) / name).exists():
                shutil.copy(Path(checkpoint.directory) / name, tmp / name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TwintuneError(f"could not write the merged model to {out} ({e.strerror}).") from None
    return out
