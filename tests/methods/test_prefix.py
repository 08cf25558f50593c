"""Prefix tuning against PEFT, both ways, on both backends, with and without the projection MLP.

A PEFT prefix adapter (random, non-trivial values: PEFT's own N(0, 1) and Kaiming draws) saved
with `save_pretrained` gives PEFT's logits in twintune; a twintune adapter trained a few steps
gives twintune's logits in `PeftModel.from_pretrained`. Both on the built-in tiny GPT-Neo and on
one whose local window (8) is shorter than the text, so that transformers' GPT-Neo (with PEFT's
prefix cache counted as past positions) checks the prefix masks of global and local layers. Also:
the masks' rule itself, gradient checkpointing with prefixes, and PEFT options twintune refuses.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from model_helpers import hf_model, torch_logits
from twintune.api import load
from twintune.backends.mlx.gpt_neo import GPTNeoSelfAttention as MLXAttention
from twintune.backends.mlx.mlx_lm_model import MLXLMSpec
from twintune.backends.torch.gpt_neo import GPTNeoSelfAttention as TorchAttention
from twintune.errors import TwintuneError
from twintune.formats.adapter import load_adapter, save_adapter
from twintune.formats.checkpoint import load_checkpoint
from twintune.formats.tiny_model import builtin_model_dir
from twintune.methods import BaseModel
from twintune.methods.prefix import Prefix
from twintune.models import GPTNeoSpec
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

BACKENDS = ["mlx", "torch"]
N = 5  # virtual tokens


@pytest.fixture(params=["tiny", "window-8"])
def model_dir(request, tiny_window_dir):
    return builtin_model_dir("tiny-gpt-neo") if request.param == "tiny" else tiny_window_dir


def text_ids(length: int = 20) -> np.ndarray:
    """Longer than the window-8 model's local window, so later queries no longer see the prefix there."""
    return np.random.default_rng(0).integers(0, 1024, (2, length)).astype(np.int32)


def relative(ours: np.ndarray, reference: np.ndarray) -> float:
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def peft_prefix_model(model_dir, projection: bool):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection,
                                encoder_hidden_size=32)
    return get_peft_model(hf_model(model_dir), config)


@pytest.mark.parametrize("projection", [False, True])
def test_a_peft_prefix_adapter_gives_peft_logits_in_twintune(model_dir, projection, tmp_path):
    peft_model = peft_prefix_model(model_dir, projection)
    expected = torch_logits(peft_model, text_ids())
    assert relative(torch_logits(hf_model(model_dir), text_ids()), expected) > 0.1  # the prefixes change the model
    peft_model.save_pretrained(tmp_path / "peft")

    method, state = load_adapter(tmp_path / "peft", GPTNeoSpec.from_config(load_checkpoint(str(model_dir)).config))
    assert method == Prefix(n=N, projection=False, encoder_hidden_size=32)  # the saved prefixes, as they are
    saved = peft_model.get_prompt_embedding_to_save("default").numpy()
    assert np.array_equal(state["transformer.prefix.embedding.weight"], saved)
    for backend in BACKENDS:
        model = load(str(model_dir), adapter=tmp_path / "peft", backend=backend)
        assert relative(model.logits(text_ids()), expected) < 1e-5, backend


@pytest.mark.parametrize("projection", [False, True])
def test_a_twintune_prefix_adapter_gives_twintune_logits_in_peft(model_dir, projection, tmp_path):
    from peft import PeftModel

    method = f"method={{name: prefix, n: {N}, projection: {str(projection).lower()}, encoder_hidden_size: 16}}"
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml",
                              [f"model={model_dir}", method, "data.synthetic_size=60", "train.lr=1e-2"]), "torch")
    start = run.backend.trainable_state()
    for step in range(3):
        train_step(run, step)
    state = run.backend.trainable_state()
    assert all(not np.array_equal(state[k], start[k]) for k in state)  # trained values, not the initial draw
    save_adapter(tmp_path / "ours", run.method, state, str(model_dir))

    peft_model = PeftModel.from_pretrained(hf_model(model_dir), str(tmp_path / "ours")).eval()
    assert relative(torch_logits(peft_model, text_ids()), run.backend.logits(text_ids())) < 1e-5


def test_the_prefix_masks_count_virtual_tokens_as_past_positions():
    """Query i sits at position past + i. A global layer's queries see every prefix key and the text
    up to themselves; a local layer's see keys fewer than `window` positions back, prefix included."""
    spec = GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)
    spec = dataclasses.replace(spec, window_size=8)
    T, past = 12, N
    query, key = np.arange(past, past + T)[:, None], np.arange(past + T)[None, :]
    for kind, expected in (("global", key <= query), ("local", (key <= query) & (query - key < 8))):
        assert expected[:, :past].any() and (kind == "global") == expected[:, :past].all()
        torch_mask = TorchAttention(spec, kind).mask(T, past, torch.device("cpu")).numpy()
        mlx_mask = np.array(MLXAttention(spec, kind).mask(T, past))
        assert np.array_equal(torch_mask, expected) and np.array_equal(mlx_mask, expected), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_gives_the_same_steps_with_prefixes(backend):
    losses = {}
    for checkpointing in (False, True):
        recipe = load_recipe("recipes/demo-financial-sentiment.yaml",
                             ["method={name: prefix, n: 4, projection: true, encoder_hidden_size: 16}",
                              "data.synthetic_size=60", "train.batch_size=4", "train.lr=1e-2",
                              f"train.gradient_checkpointing={checkpointing}", "train.warmup_steps=0"])
        run = prepare(recipe, backend)
        losses[checkpointing] = [train_step(run, step)["loss"] for step in range(4)]
    assert len(set(losses[False])) == 4  # the prefixes train: every step's loss differs
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)


def test_the_saved_prefixes_are_what_the_projection_computes():
    method = Prefix(n=3, projection=True, encoder_hidden_size=8)
    run = prepare(dataclasses.replace(load_recipe("recipes/demo-financial-sentiment.yaml"), method=method), "torch",
                  with_data=False)
    state = run.backend.trainable_state()
    table = method.saved_values(state)["transformer.prefix.embedding.weight"]
    prefixes = run.backend.model.transformer.prefix()
    keys = table.reshape(3, 2 * len(prefixes), -1, 16).transpose(1, 2, 0, 3)  # (blocks * 2, heads, n, head_dim)
    for layer, (k, v) in enumerate(prefixes):
        np.testing.assert_allclose(k.detach().numpy(), keys[2 * layer], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v.detach().numpy(), keys[2 * layer + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["random", "zero"])
@pytest.mark.parametrize("projection", [False, True])
def test_the_trained_values_are_peft_prefix_encoders_by_name_shape_and_zeros(projection, init):
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning import PrefixEncoder

    spec = GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)
    ours = Prefix(n=N, projection=projection, encoder_hidden_size=24, init=init).plan(BaseModel(spec, {}), seed=0)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection,
                                encoder_hidden_size=24, token_dim=spec.hidden_size, num_layers=spec.num_layers,
                                num_attention_heads=spec.num_heads, init_weights="zero" if init == "zero" else None)
    theirs = {f"transformer.prefix.{k}": v.detach().numpy() for k, v in PrefixEncoder(config).state_dict().items()}
    values = ours.initial_values()
    assert {k: v.shape for k, v in values.items()} == {k: v.shape for k, v in theirs.items()}
    assert {k for k, v in values.items() if not v.any()} == {k for k, v in theirs.items() if not v.any()}


# ---- what twintune refuses ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft-prefix") / "adapter"
    peft_prefix_model(builtin_model_dir("tiny-gpt-neo"), projection=False).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("option, value, match", [
    ("task_type", "SEQ_2_SEQ_LM", "for task_type 'SEQ_2_SEQ_LM'; twintune's prefix tuning is for causal"),
    ("num_transformer_submodules", 2, "num_transformer_submodules=2 .for an encoder-decoder model"),
    ("modules_to_save", ["score"], r"modules_to_save=\['score'\] .fully trained extra modules"),
    ("num_virtual_tokens", 0, "num_virtual_tokens=0; it must be a positive integer"),
    ("init_weights", "gaussian", "init_weights='gaussian'"),
    ("num_layers", 6, r"has shape \(5, 768\) but layer 'transformer.prefix' of this model with n=5 virtual tokens"),
])
def test_a_peft_prefix_adapter_that_twintune_cannot_express_is_refused(peft_adapter, option, value, match, tmp_path):
    directory = shutil.copytree(peft_adapter, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    config[option] = value
    if option == "num_layers":  # an adapter made for a 6-block model: its prefixes' shape says so
        from safetensors.numpy import save_file

        save_file({"prompt_embeddings": np.zeros((N, 6 * 2 * 64), np.float32)}, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(config))
    spec = GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)
    with pytest.raises(TwintuneError, match=match) as refused:
        load_adapter(directory, spec)
    assert "\n" not in str(refused.value)


def test_models_without_twintunes_gpt_neo_are_refused():
    spec = MLXLMSpec(vocab_size=300, layers=(("model.layers.0.self_attn.q_proj", (32, 32)),))
    with pytest.raises(TwintuneError, match="method prefix fills transformer.prefix, slots that only twintune's GPT-Neo has"):
        Prefix().plan(BaseModel(spec, {}), seed=0)
