"""Checkpoints in: transformers' own save_pretrained output, .bin via the safe path, hub offline."""

import json
import shutil

import numpy as np
import pytest
import torch

from twintune.backends.mlx.backend import MLXBackend
from twintune.backends.torch.backend import TorchBackend
from twintune.errors import TwintuneError
from twintune.formats.checkpoint import load_checkpoint, load_tokenizer
from twintune.models import GPTNeoSpec, gpt_neo_weights


def _hf_model(seed=0):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoConfig(vocab_size=120, max_position_embeddings=64, hidden_size=32, num_layers=2,
                          num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8)
    return GPTNeoForCausalLM(config).eval()


def _logits_all(model_dir, ids):
    ckpt = load_checkpoint(str(model_dir))
    spec = GPTNeoSpec.from_config(ckpt.config)
    weights = gpt_neo_weights(spec, ckpt.weights)
    return MLXBackend(spec, weights).logits(ids), TorchBackend(spec, weights).logits(ids)


def _save_bin_only(model, directory):
    """A checkpoint as older hub repos ship it: config.json + pytorch_model.bin (a pickle)."""
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


@pytest.mark.parametrize("safe", [True, False])
def test_transformers_checkpoint_loads_in_both_backends(tmp_path, safe):
    model = _hf_model()
    if safe:
        model.save_pretrained(tmp_path)
    else:
        _save_bin_only(model, tmp_path)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    ids = np.random.default_rng(0).integers(0, 120, (2, 20)).astype(np.int32)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids).long()).logits.numpy()
    mlx_logits, torch_logits = _logits_all(tmp_path, ids)
    assert np.abs(torch_logits - reference).max() < 1e-5
    assert np.abs(mlx_logits - reference).max() < 1e-4


def test_bin_is_read_with_weights_only(tmp_path, monkeypatch):
    _save_bin_only(_hf_model(), tmp_path)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(str(tmp_path))
    assert seen.get("weights_only") is True


def test_sharded_safetensors_with_index(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ckpt = load_checkpoint(str(tmp_path))
    spec = GPTNeoSpec.from_config(ckpt.config)
    assert set(gpt_neo_weights(spec, ckpt.weights)) == set(spec.weight_shapes())


def test_hub_id_offline_gives_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TwintuneError) as err:
        load_checkpoint("EleutherAI/gpt-neo-1.3B")
    message = str(err.value)
    assert "cannot reach the Hugging Face hub" in message and "local directory" in message
    assert "\n" not in message


def test_missing_dir_and_corrupt_safetensors(tmp_path, tiny_dir):
    with pytest.raises(TwintuneError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TwintuneError, match="corrupt"):
        load_checkpoint(str(broken))
    (broken / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TwintuneError, match="corrupt"):
        load_checkpoint(str(broken))


def test_bf16_safetensors_widen_to_float32(tmp_path):
    from safetensors.torch import save_file

    from twintune.formats.safetensors_io import read_safetensors

    t = torch.randn(4, 5).to(torch.bfloat16)
    save_file({"w": t}, tmp_path / "x.safetensors")
    assert np.array_equal(read_safetensors(tmp_path / "x.safetensors")["w"], t.float().numpy())


def test_tiny_model_tokenizer_loads_in_transformers_too(tiny_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny_dir)
    theirs = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Sentence: Operating profit rose by 12.4 % .\nSentiment: positive"
    assert ours.encode(text).ids == theirs(text)["input_ids"]
    for word in (" positive", " negative", " neutral"):
        assert len(ours.encode(word).ids) == 1
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "gpt_neo"


def test_gpt2_vocab_merges_tokenizer(tmp_path, tiny_dir):
    """Hub GPT-Neo repos ship vocab.json + merges.txt: read them as GPT2TokenizerFast does."""
    load_tokenizer(tiny_dir).model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    text = "Net sales fell to EUR 12.0 mn ."
    assert load_tokenizer(tmp_path).encode(text).ids == load_tokenizer(tiny_dir).encode(text).ids


@pytest.mark.parametrize("header", [b"[]", b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 16]}}'])
def test_malformed_safetensors_headers_are_refused(tmp_path, header):
    import struct

    from twintune.formats.safetensors_io import read_safetensors

    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(TwintuneError, match="corrupt or not safetensors"):
        read_safetensors(path)
