"""Adapters that travel: twintune's LoRA adapters load in Hugging Face PEFT, PEFT's load in twintune,
with the same logits either way, on both backends; bad adapters are refused with one sentence."""

import json
import shutil

import numpy as np
import pytest
import torch

from model_helpers import hf_model, torch_logits
from twintune.errors import TwintuneError
from twintune.formats.adapter import load_adapter, save_adapter
from twintune.formats.checkpoint import load_checkpoint
from twintune.formats.safetensors_io import read_safetensors, write_safetensors
from twintune.methods import LoRA
from twintune.models import GPTNeoSpec
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

BACKENDS = ["mlx", "torch"]
PEFT_TARGETS = ["q_proj", "v_proj", "c_fc"]
PEFT_REGEX = r".*\.h\.[02]\..*(k_proj|c_proj)"


def _recipe(*overrides):
    return load_recipe("recipes/demo-financial-sentiment.yaml",
                       ["train.max_steps=3", "data.synthetic_size=120", *overrides])


def _ids(spec: GPTNeoSpec, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.vocab_size, (1, length)).astype(np.int32)


def _assert_same_logits(ours: np.ndarray, reference: np.ndarray, tol: float = 1e-5) -> None:
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < tol, f"logits differ by {error:.2e} of their scale"


# ---- twintune -> PEFT --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_trained_twintune_adapter_gives_the_same_logits_in_peft(backend, tmp_path):
    from peft import PeftModel

    run = prepare(_recipe(), backend)
    for step in range(3):
        train_step(run, step)
    state = run.backend.trainable_state()
    assert all(np.abs(v).max() > 0 for k, v in state.items() if ".lora_B." in k)  # the adapter does something
    adapter_dir = save_adapter(tmp_path / "adapter", run.method, state, run.recipe.model)

    peft_model = PeftModel.from_pretrained(hf_model(run.model_dir), str(adapter_dir)).eval()
    ids = _ids(run.spec)
    reference = torch_logits(peft_model, ids)
    _assert_same_logits(run.backend.logits(ids), reference)
    with peft_model.disable_adapter():  # guard against an adapter PEFT silently ignored
        base = torch_logits(peft_model, ids)
    assert np.abs(base - reference).max() / np.abs(reference).max() > 1e-4

    # And back: twintune reads its own adapter to the same spec and the same values, bit for bit.
    method, loaded = load_adapter(adapter_dir, run.spec)
    assert (method.r, method.alpha, method.dropout, method.rslora) == \
        (run.method.r, run.method.alpha, run.method.dropout, run.method.rslora)
    assert method.targets(run.spec.linear_layers()) == run.method.targets(run.spec.linear_layers())
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], value)


# ---- PEFT -> twintune --------------------------------------------------------------------------

def _save_peft_adapter(model_dir, out_dir, target_modules, seed=0, **options):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved; returns its logits on test ids."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False, **options)
    model = get_peft_model(hf_model(model_dir), config).eval()
    model.save_pretrained(str(out_dir))
    spec = GPTNeoSpec.from_config(load_checkpoint(str(model_dir)).config)
    ids = _ids(spec, seed=seed)
    return ids, torch_logits(model, ids)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_window_dir):
    out = tmp_path_factory.mktemp("peft") / "adapter"
    ids, logits = _save_peft_adapter(tiny_window_dir, out, PEFT_TARGETS)
    return out, ids, logits


@pytest.fixture(scope="module")
def peft_regex_adapter(tmp_path_factory, tiny_window_dir):
    out = tmp_path_factory.mktemp("peft-regex") / "adapter"
    ids, logits = _save_peft_adapter(tiny_window_dir, out, PEFT_REGEX, seed=1, use_rslora=True)
    return out, ids, logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_adapter_gives_the_same_logits_in_twintune(backend, peft_adapter, tiny_window_dir):
    adapter_dir, ids, reference = peft_adapter
    assert ids.shape[1] > 8  # longer than the local window of tiny_window_dir
    run = prepare(_recipe(f"model={tiny_window_dir}", "method.r=4", "method.alpha=8",
                          "method.target_modules=[q_proj, v_proj, c_fc]"), backend)
    method, state = load_adapter(adapter_dir, run.spec)

    assert (method.r, method.alpha, method.dropout, method.rslora) == (4, 8.0, 0.0, False)
    assert sorted(method.target_modules) == sorted(PEFT_TARGETS)
    layers = run.spec.linear_layers()
    assert method.targets(layers) == run.method.targets(layers)
    assert len(state) == 2 * 3 * run.spec.num_layers
    assert all(np.abs(v).max() > 0 for v in state.values())  # init_lora_weights=False: B is not zero

    before = run.backend.logits(ids)
    run.backend.set_trainable_state(state)
    assert set(run.backend.trainable_state()) == set(state)
    ours = run.backend.logits(ids)
    _assert_same_logits(ours, reference)
    assert np.abs(before - reference).max() / np.abs(reference).max() > 1e-4  # the adapter mattered


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_adapter_with_a_regex_target_and_rslora_gives_the_same_logits(backend, peft_regex_adapter,
                                                                           tiny_window_dir):
    adapter_dir, ids, reference = peft_regex_adapter
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"] == PEFT_REGEX
    run = prepare(_recipe(f"model={tiny_window_dir}", "method.r=4", "method.alpha=8",
                          f"method.target_modules={PEFT_REGEX}", "method.rslora=true"), backend)
    assert run.method.target_modules == PEFT_REGEX
    method, state = load_adapter(adapter_dir, run.spec)
    assert method.target_modules == PEFT_REGEX
    assert method.rslora and method.scale == 8 / 2  # alpha / sqrt(r)
    assert sorted({k.rsplit(".lora_", 1)[0] for k in state}) == [
        "transformer.h.0.attn.attention.k_proj", "transformer.h.0.mlp.c_proj",
        "transformer.h.2.attn.attention.k_proj", "transformer.h.2.mlp.c_proj"]
    run.backend.set_trainable_state(state)
    _assert_same_logits(run.backend.logits(ids), reference)


def test_peft_names_with_default_or_without_prefix_and_bin_files_load_alike(peft_adapter, tiny_window_dir, tmp_path):
    adapter_dir, _, _ = peft_adapter
    spec = GPTNeoSpec.from_config(load_checkpoint(str(tiny_window_dir)).config)
    method, state = load_adapter(adapter_dir, spec)
    saved = read_safetensors(adapter_dir / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in saved)

    def variant(name, tensors, weights_file="adapter_model.safetensors"):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(adapter_dir / "adapter_config.json", d)
        if weights_file.endswith(".bin"):
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, d / weights_file)
        else:
            write_safetensors(d / weights_file, tensors)
        return d

    in_memory = {k.replace(".weight", ".default.weight"): v for k, v in saved.items()}
    no_prefix = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    half = {k: v.astype(np.float16) for k, v in saved.items()}
    for d in (variant("default", in_memory), variant("no-prefix", no_prefix),
              variant("bin", saved, "adapter_model.bin")):
        other_method, other = load_adapter(d, spec)
        assert other_method == method
        assert set(other) == set(state)
        assert all(np.array_equal(other[k], state[k]) for k in state)
    _, from_half = load_adapter(variant("half", half), spec)
    assert all(from_half[k].dtype == np.float32 for k in from_half)
    assert all(np.array_equal(from_half[k], state[k].astype(np.float16).astype(np.float32)) for k in state)


# ---- bad adapters ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_spec():
    return GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)


@pytest.fixture
def good(tmp_path, tiny_spec):
    """A valid twintune-written adapter (non-zero B) to break in one way per test."""
    method = LoRA(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    state = method.init_values(tiny_spec.linear_layers(), seed=0)
    state = {k: v + 0.01 if ".lora_B." in k else v for k, v in state.items()}
    directory = save_adapter(tmp_path / "adapter", method, state, "builtin:tiny-gpt-neo")
    load_adapter(directory, tiny_spec)  # good before it is broken
    return directory


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = read_safetensors(path)
    edit(tensors)
    write_safetensors(path, tensors)


def _refused(directory, spec, match):
    with pytest.raises(TwintuneError, match=match) as info:
        load_adapter(directory, spec)
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", "?"))
    return message


def test_missing_directory_and_files_are_refused(good, tiny_spec, tmp_path):
    _refused(tmp_path / "nowhere", tiny_spec, r"adapter directory .*nowhere does not exist")
    (good / "adapter_model.safetensors").unlink()
    _refused(good, tiny_spec, r"has no adapter_model\.safetensors")
    (good / "adapter_config.json").unlink()
    _refused(good, tiny_spec, r"has no adapter_config\.json")


def test_unreadable_config_is_refused(good, tiny_spec):
    (good / "adapter_config.json").write_text("{not json")
    _refused(good, tiny_spec, r"adapter_config\.json is not valid JSON")
    (good / "adapter_config.json").write_text("[1, 2]")
    _refused(good, tiny_spec, r"adapter_config\.json must hold a JSON object")


@pytest.mark.parametrize("corrupt", [
    lambda raw: raw[: len(raw) // 2],                     # truncated: tensors past the end
    lambda raw: b"\x00" * 5,                               # shorter than the header length
    lambda raw: b"\xff" * 8 + raw[8:],                     # header length past the end
    lambda raw: (2).to_bytes(8, "little") + b"[]" + raw,  # a header that is not a JSON object
    lambda raw: (4).to_bytes(8, "little") + b"\xff\xfe{}",  # a header that is not text
], ids=["truncated", "tiny", "header-length", "header-list", "header-bytes"])
def test_corrupt_safetensors_is_refused(good, tiny_spec, corrupt):
    path = good / "adapter_model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    _refused(good, tiny_spec, r"adapter_model\.safetensors is corrupt or not safetensors")


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": None}, r"names no peft_type in adapter_config\.json"),
    ({"peft_type": "LOHA"}, r"PEFT 'LOHA' adapter; twintune loads PEFT adapters of type IA3, LORA, PREFIX_TUNING, "
                            r"PROMPT_TUNING, P_TUNING"),
    ({"use_dora": "yes"}, r"use_dora='yes'; it must be true or false"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern=\{'q_proj': 0\}; it must map layer names to positive numbers"),
    ({"alpha_pattern": ["v_proj"]}, r"alpha_pattern=\['v_proj'\]"),
    ({"layers_to_transform": [0], "layers_pattern": "layers"}, r"layers_pattern='layers', but this model's blocks are 'h'"),
    ({"layers_to_transform": [0]}, r"weights for layer 'transformer\.h\.1\..*', which its target_modules"),
    ({"rank_pattern": {"q_proj": 2}}, r"has shape \(4, 64\) but layer .*q_proj.* with r=2 needs \(2, 64\)"),
    ({"use_dora": True}, r"no lora_magnitude_vector weight for layer"),
    ({"fan_in_fan_out": True}, r"fan_in_fan_out=True"),
    ({"bias": "all"}, r"bias='all' \(trained biases\)"),
    ({"bias": "lora_only"}, r"bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]"),
    ({"lora_bias": True}, r"lora_bias=True"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa', which changes the base model's weights"),
    ({"r": 0}, r"rank r=0; it must be a positive integer"),
    ({"lora_alpha": "big"}, r"lora_alpha='big'"),
    ({"target_modules": ["lm_head"]}, r"target module 'lm_head' is not a linear layer"),
    ({"target_modules": 3}, r"target_modules=3; it must be a list"),
])
def test_unsupported_or_bad_settings_are_refused_by_name(good, tiny_spec, changes, match):
    _edit_config(good, **changes)
    _refused(good, tiny_spec, match)


def test_neutral_settings_written_as_null_or_empty_load(good, tiny_spec):
    _edit_config(good, modules_to_save=[], rank_pattern=None, alpha_pattern={}, layers_to_transform=None,
                 exclude_modules=None, fan_in_fan_out=None, init_lora_weights="gaussian")
    method, state = load_adapter(good, tiny_spec)
    assert method.r == 4 and len(state) == 2 * 2 * tiny_spec.num_layers


def test_tensor_for_a_layer_the_model_lacks_is_refused(good, tiny_spec):
    def rename(t):
        t["base_model.model.transformer.h.9.attn.attention.q_proj.lora_A.weight"] = \
            t.pop("base_model.model.transformer.h.0.attn.attention.q_proj.lora_A.weight")
    _edit_weights(good, rename)
    _refused(good, tiny_spec,
             r"names layer 'transformer\.h\.9\.attn\.attention\.q_proj', which this model does not have")


def test_adapter_for_another_base_is_refused(good, tiny_spec):
    import dataclasses

    wider = dataclasses.replace(tiny_spec, hidden_size=2 * tiny_spec.hidden_size)
    method = LoRA(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    save_adapter(good, method, method.init_values(wider.linear_layers(), seed=0), "someone/else")
    message = _refused(good, tiny_spec,
                       r"has shape \(4, 128\) but layer .* needs \(4, 64\); the adapter does not match this base model")
    assert "lora_A" in message


def test_rank_that_disagrees_with_the_tensors_is_refused(good, tiny_spec):
    _edit_config(good, r=8)
    _refused(good, tiny_spec, r"has shape \(4, 64\) but layer .* with r=8 needs \(8, 64\)")


def test_missing_lora_b_is_refused(good, tiny_spec):
    _edit_weights(good, lambda t: t.pop("base_model.model.transformer.h.1.attn.attention.v_proj.lora_B.weight"))
    _refused(good, tiny_spec, r"no lora_B weight for layer 'transformer\.h\.1\.attn\.attention\.v_proj'")


def test_missing_layer_the_config_targets_is_refused(good, tiny_spec):
    def drop(t):
        for part in ("A", "B"):
            t.pop(f"base_model.model.transformer.h.3.attn.attention.q_proj.lora_{part}.weight")
    _edit_weights(good, drop)
    _refused(good, tiny_spec, r"no lora_A/lora_B weights for layer 'transformer\.h\.3\.attn\.attention\.q_proj', "
                              r"which its target_modules select")


def test_weights_for_a_layer_the_config_does_not_target_are_refused(good, tiny_spec):
    _edit_config(good, target_modules=["q_proj"])
    _refused(good, tiny_spec, r"weights for layer 'transformer\.h\.0\.attn\.attention\.v_proj', which its "
                              r"target_modules \['q_proj'\] do not select")


def test_tensor_that_is_not_lora_is_refused(good, tiny_spec):
    def add(t):
        t["base_model.model.transformer.h.0.attn.attention.q_proj.lora_magnitude_vector"] = np.ones(64, np.float32)
    _edit_weights(good, add)
    _refused(good, tiny_spec, r"'base_model\.model\.transformer\.h\.0\.attn\.attention\.q_proj\.lora_magnitude_vector' "
                              r"is not a LoRA lora_A/lora_B weight")


def test_integer_tensor_is_refused(good, tiny_spec):
    name = "base_model.model.transformer.h.0.attn.attention.q_proj.lora_A.weight"
    _edit_weights(good, lambda t: t.__setitem__(name, t[name].astype(np.int32)))
    _refused(good, tiny_spec, r"has dtype int32; LoRA weights must be floating point")


_UNPICKLED = []


def _mark():
    _UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_mark, ())


def test_bin_adapter_is_read_only_through_weights_only_torch_load(good, tiny_spec):
    tensors = read_safetensors(good / "adapter_model.safetensors")
    (good / "adapter_model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}, good / "adapter_model.bin")
    _, state = load_adapter(good, tiny_spec)
    assert all(v.dtype == np.float32 for v in state.values())

    torch.save({"x": _Payload()}, good / "adapter_model.bin")
    _refused(good, tiny_spec, r"adapter_model\.bin could not be read safely as PyTorch weights")
    assert not _UNPICKLED  # the pickle's code never ran
    (good / "adapter_model.bin").write_bytes(b"not a pickle at all")
    _refused(good, tiny_spec, r"adapter_model\.bin could not be read safely as PyTorch weights")
    torch.save([torch.zeros(2)], good / "adapter_model.bin")
    _refused(good, tiny_spec, r"adapter_model\.bin does not hold a dict of tensors")
