"""A run as one GGUF file for llama.cpp and Ollama: `twintune export RUN --format gguf --out FILE.gguf
[--quantize f16|q8_0|f32]`, for llama-family mlx-lm models.

The file holds the merged model (the run's trained values folded into its base, as `twintune
merge` does, in float32 first), the tokenizer (its BPE vocabulary, merges and special tokens) and
the metadata llama.cpp reads (`llama.*` sizes, rope and norm settings, the chat template), written
with the `gguf` package (llama.cpp's own writer). Tensors are named as llama.cpp's converter names
them (`token_embd`, `blk.N.attn_q`, ...), and the query and key projections are permuted as it
permutes them: llama.cpp's rotary embedding pairs a head's dimensions (0, 1), (2, 3), ... where
Hugging Face's pairs (0, d/2), (1, d/2 + 1), .... 1-D tensors (norms) stay float32; `q8_0` stores
each matrix whose rows divide into blocks of 32 as 8-bit blocks with a float16 scale (the others as
float16).

`--format gguf-lora` writes a LoRA run's adapter alone, as llama.cpp's LoRA files
(`llama-cli -m base.gguf --lora adapter.gguf`): `general.type` adapter, `adapter.lora.alpha`, each
adapted matrix's `.lora_a` (r x in) and `.lora_b` (out x r) under its llama.cpp name, B's rows
permuted with the query and key rows they add to.

GPT-Neo is refused by name: llama.cpp has no GPT-Neo architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError

QUANTIZATIONS = ("f16", "q8_0", "f32")
LLAMA_FAMILY = ("llama", "mistral")  # mlx-lm's families that llama.cpp reads as its `llama` architecture


def permute_for_rope(weights: np.ndarray, heads: int) -> np.ndarray:
    """A query or key projection's rows in llama.cpp's rotary order (convert_hf_to_gguf.py's `permute`):
    each head's two halves interleaved.

    Example:
        >>> permute_for_rope(np.arange(8.0).reshape(8, 1), heads=2)[:, 0].tolist()
        [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_tensors(merged: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """The merged weights (Hugging Face llama names) under llama.cpp's names, float32, query and key
    rows permuted for its rotary embedding."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    tensors = {}
    for name, value in merged.items():
        if "rotary_emb.inv_freq" in name:  # recomputed from rope_theta by llama.cpp
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TwintuneError(f"tensor {name!r} has no place in llama.cpp's llama architecture.")
        tensors[target] = in_rope_order(name.removesuffix(".weight"), np.asarray(value, np.float32), config)
    return tensors


def in_rope_order(layer: str, rows: np.ndarray, config: dict) -> np.ndarray:
    """The output rows of a query or key projection (its weight, or a LoRA B that adds to it) permuted
    for llama.cpp's rotary embedding; any other layer's as they are."""
    heads = int(config["num_attention_heads"])
    if layer.endswith("self_attn.q_proj"):
        return permute_for_rope(rows, heads)
    if layer.endswith("self_attn.k_proj"):
        return permute_for_rope(rows, int(config.get("num_key_value_heads") or heads))
    return rows


def _new_writer(path: Path):
    """A GGUF writer on `path`.partial (renamed by _finish when whole: never half a file at `path`)."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    return gguf.GGUFWriter(str(path.with_name(path.name + ".partial")), "llama")


def _finish(writer, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.with_name(path.name + ".partial").replace(path)
    return path


def write_gguf(path: str | Path, merged: dict[str, np.ndarray], config: dict, model_dir: Path, name: str,
               quantize: str = "f16", chat_template: str | None = None) -> Path:
    """Write the merged llama-family model `merged` (Hugging Face names) with its tokenizer and metadata."""
    import gguf

    if quantize not in QUANTIZATIONS:
        raise TwintuneError(f"--quantize {quantize!r} is unknown; choose {', '.join(QUANTIZATIONS)}.")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize]
    path = Path(path)
    writer = _new_writer(path)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // heads))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(file_type)
    _add_tokenizer(writer, model_dir, int(config["vocab_size"]), chat_template)
    for tensor, value in gguf_tensors(merged, config).items():
        _add_tensor(writer, tensor, value, quantize)
    return _finish(writer, path)


def _add_tensor(writer, name: str, value: np.ndarray, quantize: str) -> None:
    import gguf

    if value.ndim == 1 or quantize == "f32":
        writer.add_tensor(name, value.astype(np.float32))
    elif quantize == "q8_0" and value.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)  # (its shape: the bytes of each row)
    else:
        writer.add_tensor(name, value.astype(np.float16))


def _add_tokenizer(writer, model_dir: Path, vocab_size: int, chat_template: str | None) -> None:
    """A byte-level BPE tokenizer.json (GPT-2's kind, llama 3's) as llama.cpp's "gpt2" tokenizer."""
    path = model_dir / "tokenizer.json"
    try:
        tokenizer = json.loads(path.read_text())
    except (OSError, ValueError):
        raise TwintuneError(f"GGUF export reads the model's tokenizer.json, and {path} cannot be read.") from None
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise TwintuneError(f"GGUF export writes byte-level BPE tokenizers; {path} is a {model.get('type')} tokenizer.")
    vocab = dict(model["vocab"])
    special = {}
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special[added["id"]] = added["content"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf_token_type("unused")] * vocab_size
    for text, index in vocab.items():
        if index < vocab_size:
            tokens[index] = text
            types[index] = gguf_token_type("control" if index in special else "normal")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = _tokenizer_config(model_dir)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        text = config.get(key)
        text = text.get("content") if isinstance(text, dict) else text
        if text in vocab:
            add(vocab[text])
    template = chat_template or config.get("chat_template")
    if isinstance(template, str):
        writer.add_chat_template(template)


def gguf_token_type(kind: str) -> int:
    import gguf

    return {"normal": gguf.TokenType.NORMAL, "control": gguf.TokenType.CONTROL, "unused": gguf.TokenType.UNUSED}[kind]


def _tokenizer_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return {}


def write_gguf_lora(path: str | Path, adapter: dict[str, np.ndarray], config: dict, name: str, alpha: float) -> Path:
    """A LoRA adapter (PEFT names: LAYER.lora_A.weight, LAYER.lora_B.weight; one rank and alpha) as
    llama.cpp's GGUF LoRA file, float32."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    path = Path(path)
    writer = _new_writer(path)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for a_name in sorted(n for n in adapter if n.endswith(".lora_A.weight")):
        layer = a_name[: -len(".lora_A.weight")]
        target = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        if target is None:
            raise TwintuneError(f"adapted layer {layer!r} has no place in llama.cpp's llama architecture.")
        writer.add_tensor(f"{target}.lora_a", np.asarray(adapter[a_name], np.float32))
        writer.add_tensor(f"{target}.lora_b", in_rope_order(layer, np.asarray(adapter[f"{layer}.lora_B.weight"],
                                                                              np.float32), config))
    return _finish(writer, path)
