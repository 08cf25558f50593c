"""Tiny GPT-Neo checkpoints with a tokenizer, made offline: for the demo and every test.

`write_tiny_model` writes random weights in the Hugging Face layout (config.json,
model.safetensors, tokenizer.json), read back through the same loading code as a real checkpoint.
The built-in `builtin:tiny-gpt-neo` is the same architecture pre-trained (3000 steps) on the synthetic
corpus (tools/pretrain_tiny_model.py) and shipped in twintune/assets/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError

TINY_CONFIG = {
    "model_type": "gpt_neo",
    "architectures": ["GPTNeoForCausalLM"],
    "hidden_size": 64,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 256,
    "attention_types": [[["global", "local"], 2]],
    "window_size": 256,
    "max_position_embeddings": 512,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "embed_dropout": 0.0,
    "attention_dropout": 0.0,
    "resid_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
EOS = "<|endoftext|>"
BUILTINS = ("tiny-gpt-neo",)


def train_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE (GPT-2 style) trained on the built-in financial corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from twintune.data.synthetic import corpus_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Label words appear often so each becomes one token, as they are in GPT-2's vocabulary.
    words = [" positive", " negative", " neutral", "Sentiment", "Sentence"] * 200
    tokenizer.train_from_iterator(corpus_text(seed=0) + words, trainer=trainer)
    return tokenizer


def random_gpt_neo_weights(config: dict, seed: int = 0, embedding_std: float = 0.2) -> dict[str, np.ndarray]:
    """Random GPT-Neo weights scaled so a tiny model can learn: q/k/out_proj/c_proj N(0, 0.02^2), other linear
    layers N(0, 1/fan_in), embeddings N(0, embedding_std^2), LayerNorm 1/0, biases 0.

    transformers' N(0, 0.02) init would cap a 64-wide tied head's logits near 1, so LoRA
    could not express a confident label.
    """
    from twintune.models import GPTNeoSpec

    spec = GPTNeoSpec.from_config(config)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in spec.weight_shapes().items():
        if ".ln_" in name:
            value = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        elif name.endswith(("wte.weight", "wpe.weight")):
            value = rng.normal(0.0, embedding_std, size=shape)
        elif name.endswith(("q_proj.weight", "k_proj.weight", "out_proj.weight", "c_proj.weight")):
            # GPT-Neo does not scale scores by 1/sqrt(d): small q/k keep attention near
            # uniform at first, so every word reaches the answer position; small output
            # projections keep the random blocks from drowning the residual stream.
            value = rng.normal(0.0, 0.02, size=shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), size=shape)
        weights[name] = value.astype(np.float32)
    return weights


def write_tiny_model(directory: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a tiny random GPT-Neo + tokenizer to `directory` (Hugging Face layout), offline.

    Example:
        >>> write_tiny_model("/tmp/tiny")      # then: load_checkpoint("/tmp/tiny")
        PosixPath('/tmp/tiny')
    """
    from twintune.formats.safetensors_io import write_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = dict(TINY_CONFIG, vocab_size=tokenizer.get_vocab_size(), **overrides)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(directory / "model.safetensors", random_gpt_neo_weights(config, seed),
                      metadata={"format": "pt"})
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": config["max_position_embeddings"],
        "bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "add_prefix_space": False,
    }, indent=2))
    return directory


ASSETS = Path(__file__).resolve().parent.parent / "assets"


def builtin_model_dir(name: str) -> Path:
    """The directory of a built-in model shipped with the package (see tools/pretrain_tiny_model.py).

    Example:
        >>> (builtin_model_dir("tiny-gpt-neo") / "config.json").exists()
        True
    """
    if name not in BUILTINS:
        raise TwintuneError(f"there is no built-in model {name!r}; built-ins are: {', '.join(BUILTINS)}.")
    directory = ASSETS / name
    if not (directory / "model.safetensors").exists():
        raise TwintuneError(f"the built-in model files are missing from {directory}; reinstall twintune "
                            "or rebuild them with tools/pretrain_tiny_model.py.")
    return directory
