"""`twintune export RUN --format gguf`: a LoRA run on a tiny llama (mlx-lm) model as one GGUF file, read
back with the gguf package's own reader: every tensor under llama.cpp's name with the merged values
(float32 exactly, float16 to its rounding, q8_0 within half a step of its blocks), query and key rows
in llama.cpp's rotary order, the metadata and tokenizer llama.cpp reads; GPT-Neo refused by name."""

import json

import mlx.core as mx
import numpy as np
import pytest

from model_helpers import LLAMA, write_tiny_llama
from twintune.cli import main
from twintune.formats.safetensors_io import read_safetensors
from twintune.recipe import load_recipe
from twintune.train.loop import train

DEMO = "recipes/demo-financial-sentiment.yaml"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model_dir = write_tiny_llama(root / "tiny-llama")
    recipe = load_recipe(DEMO, [f"model={model_dir}", "task=causal_lm", "data.source=synthetic", "train.max_steps=6",
                                "train.lr=1e-2", "method={name: lora, r: 4, alpha: 8, target_modules: [q_proj, k_proj, "
                                "v_proj, down_proj]}"])
    train(recipe, "mlx", root / "run", progress=False)
    return root


def _expected(root):
    """The merged weights computed here: base + (alpha / r) B A, from the files."""
    base = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(root / "tiny-llama" / "model.safetensors")).items()}
    adapter = read_safetensors(root / "run" / "adapter" / "adapter_model.safetensors")
    for name in [n for n in adapter if n.endswith("lora_A.weight")]:
        layer = name[len("base_model.model."):-len(".lora_A.weight")]
        delta = 2.0 * adapter[name.replace("lora_A", "lora_B")] @ adapter[name]
        base[f"{layer}.weight"] = base[f"{layer}.weight"] + delta.astype(np.float32)
    return base


def _llama_cpp_permute(w, heads):  # convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(name):
    block = name.split(".")[2] if name.startswith("model.layers.") else None
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if block is None:
        return fixed[name]
    inner = name.split(".", 3)[3].removesuffix(".weight")
    return f"blk.{block}.{parts[inner]}.weight"


def _read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return tensors, fields, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("quantize", ["f32", "f16", "q8_0"])
def test_the_file_holds_the_merged_model_under_llama_cpps_names(llama_run, quantize, capsys):
    out = llama_run / f"model-{quantize}.gguf"
    assert main(["export", str(llama_run / "run"), "--format", "gguf", "--out", str(out), "--quantize", quantize]) == 0
    tensors, fields, types = _read(out)
    expected = _expected(llama_run)
    assert set(tensors) == {_gguf_names(n) for n in expected}
    base = read_safetensors(llama_run / "tiny-llama" / "model.safetensors")
    assert not np.allclose(expected["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    for name, value in expected.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = LLAMA["num_attention_heads"] if "q_proj" in name else LLAMA["num_key_value_heads"]
            value = _llama_cpp_permute(value, heads)
        got = tensors[_gguf_names(name)]
        if value.ndim == 1 or quantize == "f32":
            assert np.array_equal(got, value), name
        elif quantize == "f16":
            assert types[_gguf_names(name)] == "F16" and np.array_equal(got, value.astype(np.float16).astype(np.float32))
        else:  # 8-bit blocks of 32 with a float16 scale: half a step of its block, and the scale's rounding
            assert types[_gguf_names(name)] == "Q8_0", name
            step = np.abs(value.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            assert (np.abs(got.reshape(-1, 32) - value.reshape(-1, 32)) <= 0.51 * step + 1e-3 * np.abs(value.reshape(-1, 32))).all()
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == LLAMA["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"] == LLAMA["num_key_value_heads"]
    assert fields["llama.embedding_length"] == LLAMA["hidden_size"]
    tokenizer = json.loads((llama_run / "tiny-llama" / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 1024
    assert fields["tokenizer.ggml.tokens"][:5] == sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)[:5]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer["model"]["vocab"]["<|endoftext|>"]


def test_gpt_neo_and_an_existing_file_are_refused_by_name(llama_run, tmp_path, capsys):
    train(load_recipe(DEMO, ["train.max_steps=2"]), "torch", tmp_path / "neo", progress=False)
    assert main(["export", str(tmp_path / "neo"), "--format", "gguf", "--out", str(tmp_path / "neo.gguf")]) == 2
    assert "llama.cpp has no GPT-Neo architecture" in capsys.readouterr().err
    (tmp_path / "taken.gguf").write_text("mine")
    assert main(["export", str(llama_run / "run"), "--format", "gguf", "--out", str(tmp_path / "taken.gguf")]) == 2
    assert "exists; choose another --out (nothing was written)" in capsys.readouterr().err
    assert (tmp_path / "taken.gguf").read_text() == "mine"


def test_without_the_gguf_package_it_is_one_sentence(llama_run, tmp_path, monkeypatch):
    import sys

    from twintune.errors import TwintuneError
    from twintune.train.runs import export_run_adapter

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(TwintuneError, match=r"the gguf package, which is not installed: pip install 'twintune\[gguf\]'"):
        export_run_adapter(llama_run / "run", "gguf", tmp_path / "model.gguf")


def test_a_lora_adapter_as_llama_cpps_lora_file(llama_run):
    """general.type adapter, adapter.lora.alpha, each matrix's lora_a and lora_b under its llama.cpp
    name; B's rows permuted as the rows of the query and key projections they add to, so that
    W' + (alpha / r) B' A is the merged file's matrix."""
    out = llama_run / "adapter.gguf"
    assert main(["export", str(llama_run / "run"), "--format", "gguf-lora", "--out", str(out)]) == 0
    tensors, fields, _ = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    whole = llama_run / "merged-for-lora.gguf"
    assert main(["export", str(llama_run / "run"), "--format", "gguf", "--out", str(whole), "--quantize", "f32"]) == 0
    merged, _, _ = _read(whole)
    adapter = read_safetensors(llama_run / "run" / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * len([n for n in adapter if n.endswith("lora_A.weight")]) == 2 * 2 * 4
    for block in range(LLAMA["num_hidden_layers"]):
        for part, hf, heads in (("attn_q", "self_attn.q_proj", LLAMA["num_attention_heads"]),
                                ("attn_k", "self_attn.k_proj", LLAMA["num_key_value_heads"]),
                                ("attn_v", "self_attn.v_proj", None), ("ffn_down", "mlp.down_proj", None)):
            name = f"blk.{block}.{part}.weight"
            a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
            assert a.shape[0] == b.shape[1] == 4
            untrained = read_safetensors(llama_run / "tiny-llama" / "model.safetensors")[f"model.layers.{block}.{hf}.weight"]
            untrained = _llama_cpp_permute(untrained, heads) if heads else untrained
            assert np.allclose(untrained + (8.0 / 4) * b @ a, merged[name], atol=1e-6), name
