"""Hugging Face GPT-Neo checkpoints out: config.json + model.safetensors + the tokenizer files,
written whole into a temporary directory that is then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.formats.safetensors_io import write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def write_checkpoint(out: str | Path, model_dir: str | Path, weights: dict[str, np.ndarray]) -> Path:
    """Write `weights` as a checkpoint `GPTNeoForCausalLM.from_pretrained(out)` loads, with the base's
    config.json and tokenizer from `model_dir`. `out` must be new or empty.

    Example:
        >>> write_checkpoint("models/demo-merged", model_dir, method.merge(base, state))
        PosixPath('models/demo-merged')
    """
    out, model_dir = Path(out), Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        (tmp / "config.json").write_text(json.dumps(dict(config, architectures=["GPTNeoForCausalLM"]), indent=2))
        write_safetensors(tmp / "model.safetensors", weights, metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copy(model_dir / name, tmp / name)
        old = None
        if out.exists():  # replaced only once the new one is whole
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TwintuneError(f"could not write the model to {out} ({e.strerror}).") from None
    return out
