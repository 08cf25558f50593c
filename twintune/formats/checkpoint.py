"""Hugging Face checkpoints in: a local directory or a hub id -> config dict + numpy weights."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError
from twintune.formats.safetensors_io import read_safetensors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"]


@dataclass
class Checkpoint:
    """What a model directory holds, read once: its config and every weight as numpy."""

    directory: Path
    config: dict
    weights: dict[str, np.ndarray]


def resolve_model_dir(model: str) -> Path:
    """Turn a recipe's `model` into a local directory: an existing path, a built-in, or a hub id.

    Example:
        >>> resolve_model_dir("builtin:tiny-gpt-neo").name   # shipped in twintune/assets
        'tiny-gpt-neo'

    A hub id ("EleutherAI/gpt-neo-1.3B") is downloaded, or refused in one sentence offline.
    """
    if model.startswith("builtin:"):
        from twintune.formats.tiny_model import builtin_model_dir

        return builtin_model_dir(model.removeprefix("builtin:"))
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TwintuneError(f"model path {model} is a file; pass the directory holding config.json and the weights.")
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise TwintuneError(f"model directory {model} does not exist.")
    return _download_from_hub(model)


def _download_from_hub(repo_id: str, config_only: bool = False) -> Path:
    try:
        from huggingface_hub import snapshot_download

        if config_only:
            return Path(snapshot_download(repo_id, allow_patterns=["config.json"]))
        directory = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
        if not list(directory.glob("*.safetensors")):
            # Older repos ship only pickles; they are read with torch.load(weights_only=True).
            directory = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + ["pytorch_model*.bin*"]))
        return directory
    except Exception as e:  # the hub raises many types; all mean the same thing to the user
        name = type(e).__name__
        if "NotFound" in name and "Entry" not in name:
            raise TwintuneError(f"model {repo_id!r} is neither a local directory nor a model on the Hugging Face hub.") from None
        needed = "its config.json (all that is read here)" if config_only else "config.json and *.safetensors"
        raise TwintuneError(f"cannot reach the Hugging Face hub to download model {repo_id!r} ({name}); "
                            f"pass a local directory with {needed} instead.") from None


# The configs of public models twintune's recipes name (EleutherAI's GPT-Neo sizes), so that what
# needs only the architecture (twintune estimate) works offline
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"


def load_config(model: str) -> dict:
    """A model's config.json, without its weights (from the hub, only the config is fetched; GPT-Neo
    125M, 1.3B and 2.7B's ship with twintune).

    Example:
        >>> load_config("builtin:tiny-gpt-neo")["model_type"]
        'gpt_neo'
    """
    path = Path(model).expanduser()
    shipped = SHIPPED_CONFIGS / f"{model.replace('/', '--')}.json"
    if model.startswith("builtin:") or path.exists() or model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        config_file = resolve_model_dir(model) / "config.json"
    elif shipped.is_file():  # a public model's architecture, offline
        config_file = shipped
    else:
        config_file = _download_from_hub(model, config_only=True) / "config.json"
    if not config_file.is_file():
        raise TwintuneError(f"model directory {config_file.parent} has no config.json.")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TwintuneError(f"{config_file} is not valid JSON ({e}).") from None


def load_checkpoint(model: str) -> Checkpoint:
    """Read config.json and all weights of a model (directory, built-in or hub id) into numpy.

    Safetensors (single file or sharded with an index) are preferred; a `pytorch_model.bin`
    is only read through `torch.load(weights_only=True)`, never a plain unpickle.

    Example:
        >>> ckpt = load_checkpoint("builtin:tiny-gpt-neo")
        >>> ckpt.config["model_type"]
        'gpt_neo'
    """
    directory = resolve_model_dir(model)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise TwintuneError(f"model directory {directory} has no config.json.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise TwintuneError(f"{config_path} is not valid JSON ({e}).") from None
    return Checkpoint(directory, config, _load_weights(directory))


def _load_weights(directory: Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _merge(read_safetensors(directory / f) for f in files)
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return _merge(read_safetensors(f) for f in shards)
    index = directory / "pytorch_model.bin.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _merge(read_torch_bin(directory / f) for f in files)
    if (directory / "pytorch_model.bin").exists():
        return read_torch_bin(directory / "pytorch_model.bin")
    raise TwintuneError(f"model directory {directory} has no *.safetensors or pytorch_model.bin weights.")


def _merge(parts) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for part in parts:
        weights.update(part)
    return weights


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch pickle of tensors, read only through torch.load(weights_only=True), never a plain unpickle."""
    try:
        import torch
    except ImportError:
        raise TwintuneError(f"{path} is a PyTorch pickle and reading it safely needs torch; "
                            "install twintune[torch] or convert it to safetensors.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        raise TwintuneError(f"{path} could not be read safely as PyTorch weights ({message}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TwintuneError(f"{path} does not hold a dict of tensors, so it is not a weights file.")
    return {str(k): (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def load_tokenizer(directory: Path):
    """The model's tokenizer as a `tokenizers.Tokenizer`: tokenizer.json, or GPT-2 vocab.json + merges.txt.

    Example:
        >>> tok = load_tokenizer(resolve_model_dir("builtin:tiny-gpt-neo"))
        >>> len(tok.encode(" positive").ids)   # label words are single tokens
        1
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if (directory / "tokenizer.json").exists():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if vocab.exists() and merges.exists():
        # The byte-level BPE of GPT-2 / GPT-Neo, configured as GPT2TokenizerFast configures it.
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise TwintuneError(f"model directory {directory} has no tokenizer (tokenizer.json, or vocab.json + merges.txt).")
