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
from twintune.formats.safetensors_io import current_umask, write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
BASE_FILES = (*TOKENIZER_FILES, "generation_config.json")  # what a merged model keeps of its base as it was


def classifier_config(config: dict, labels: list[str]) -> dict:
    """A GPT-Neo config.json for transformers' GPTNeoForSequenceClassification over `labels`: their
    names, and the end-of-text token as padding, so that it pools the last real token as twintune's
    head does."""
    pad = config["eos_token_id"] if config.get("pad_token_id") is None else config["pad_token_id"]
    return {**config, "architectures": ["GPTNeoForSequenceClassification"], "problem_type": "single_label_classification",
            "id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)},
            "pad_token_id": pad}


def write_checkpoint(out: str | Path, model_dir: str | Path, weights: dict[str, np.ndarray],
                     labels: list[str] | None = None) -> Path:
    """Write `weights` as a checkpoint `GPTNeoForCausalLM.from_pretrained(out)` loads, with the base's
    config.json and tokenizer from `model_dir`. `out` must be new or empty. With `labels` (the weights
    hold a classification head, `score.weight`) it is a `GPTNeoForSequenceClassification` checkpoint:
    its config names the labels and takes the end-of-text token as padding, so transformers pools the
    last real token, as twintune's head does.

    Example:
        >>> from twintune.formats.tiny_model import builtin_model_dir
        >>> write_checkpoint("models/base-copy", builtin_model_dir("tiny-gpt-neo"), dict(base.weights))
        PosixPath('models/base-copy')
    """
    out, model_dir = Path(out), Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPTNeoForCausalLM"]
    if labels is not None:
        config = classifier_config(config, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the folder gets a directory's usual mode
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(tmp / "model.safetensors", weights, metadata={"format": "pt"})
        for name in BASE_FILES:
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
