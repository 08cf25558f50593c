"""VeRA: PEFT's projections drawn bit for bit in numpy; the same steps on both backends (float64);
PEFT's adapters (with or without saved projections) give PEFT's logits on both backends and merge as
PEFT merges; ours give our logits in PEFT; projections that are not the key's are refused by name."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from model_helpers import hf_model, torch_logits
from twintune import api
from twintune.errors import TwintuneError
from twintune.formats.adapter import load_adapter, save_adapter
from twintune.formats.checkpoint import load_checkpoint
from twintune.formats.tiny_model import builtin_model_dir
from twintune.methods import METHODS, BaseModel
from twintune.methods.vera import projections
from twintune.models import GPTNeoSpec, gpt_neo_weights
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

MODEL_DIR = builtin_model_dir("tiny-gpt-neo")
TARGETS = ["q_proj", "v_proj", "c_fc", "c_proj"]  # inputs 64 and 256, outputs 64 and 256: slices both ways
METHOD = "method={name: vera, r: 8, target_modules: [q_proj, v_proj, c_fc, c_proj], projection_prng_key: 3}"


def _recipe(*overrides):
    return load_recipe("recipes/demo-financial-sentiment.yaml",
                       ["data.synthetic_size=120", "train.max_steps=4", "train.lr=5e-2", METHOD, *overrides])


def _ids(spec: GPTNeoSpec, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.vocab_size, (1, 24)).astype(np.int32)


def _error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def tiny():
    checkpoint = load_checkpoint(str(MODEL_DIR))
    spec = GPTNeoSpec.from_config(checkpoint.config)
    return spec, gpt_neo_weights(spec, checkpoint.weights)


@pytest.mark.parametrize("key, r, largest_in, largest_out", [(0, 4, 64, 256), (3, 8, 256, 64), (2**31 + 5, 16, 96, 40)])
def test_the_projections_are_peft_s_bit_for_bit(key, r, largest_in, largest_out):
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(key)
    peft_a = _kaiming_init((r, largest_in), generator=generator).numpy()
    peft_b = _kaiming_init((largest_out, r), generator=generator).numpy()
    ours_a, ours_b = projections(key, r, largest_in, largest_out)
    np.testing.assert_array_equal(ours_a, peft_a)
    np.testing.assert_array_equal(ours_b, peft_b)


def test_vera_is_one_method_of_the_registry_with_its_own_rows():
    assert METHODS["vera"].peft_type == "VERA"
    from twintune.compare import ENTRIES

    assert "vera" in ENTRIES and '"name": "vera"' in ENTRIES["vera"].overrides[0]


def test_the_same_steps_on_both_backends_in_float64():
    runs = {backend: prepare(_recipe("dtype=float64", "method.dropout=0.1"), backend) for backend in ("mlx", "torch")}
    losses = {b: np.array([train_step(run, s)["loss"] for s in range(4)]) for b, run in runs.items()}
    assert np.abs(losses["mlx"] - losses["torch"]).max() < 1e-9 * np.abs(losses["torch"]).max()
    mlx, torch_state = runs["mlx"].backend.trainable_state(), runs["torch"].backend.trainable_state()
    assert set(mlx) == set(torch_state) and any(name.endswith(".vera_lambda_b") for name in mlx)
    for name, value in torch_state.items():
        assert np.abs(value).max() > 0, f"{name} did not train"
        np.testing.assert_allclose(mlx[name], value, rtol=0, atol=1e-9 * max(np.abs(value).max(), 1e-12))


def test_every_layer_reads_one_copy_of_the_projections():
    """Each backend converts the plan's projections once and every adapted layer slices them, as PEFT
    holds one vera_A and vera_B per model; the memory estimate counts them once."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from twintune.memory import estimate_memory

    recipe = _recipe("method.r=1024")
    layers = [m for m in prepare(recipe, "torch").backend.model.modules() if hasattr(m, "vera_lambda_d")]
    assert len(layers) == 16  # four targets in each of the four blocks
    for name in ("vera_A", "vera_B"):
        assert len({getattr(m, name).untyped_storage().data_ptr() for m in layers}) == 1, name
    before = mx.get_active_memory()
    run = prepare(recipe, "mlx")
    projections = [v for k, v in tree_flatten(run.backend.model.parameters()) if k.endswith(("vera_A", "vera_B"))]
    mx.eval(projections)
    sliced = sum(p.nbytes for p in projections)  # 29 MB as slices; the shared arrays are 2.1 MB
    assert len(projections) == 2 * len(layers) and mx.get_active_memory() - before < sliced / 2
    frozen = {r: estimate_memory(run.spec, METHODS["vera"](r=r, target_modules=TARGETS), None, 4, 32).frozen_weights
              for r in (8, 1024)}
    assert frozen[1024] - frozen[8] == 4 * (1024 - 8) * (256 + 256)  # A (r x 256) and B (256 x r), float32, once


@pytest.fixture(scope="module", params=[True, False], ids=["saved-projections", "key-only"])
def peft_adapter(request, tmp_path_factory, tiny):
    """A PEFT VeRA model with non-trivial lambdas, saved (with its projections, or with its key only);
    its logits and its weights as PEFT merges them."""
    from peft import VeraConfig, get_peft_model

    spec, _ = tiny
    torch.manual_seed(0)
    config = VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=3, save_projection=request.param)
    model = get_peft_model(hf_model(MODEL_DIR), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    out = tmp_path_factory.mktemp("peft-vera") / "adapter"
    model.save_pretrained(str(out))
    ids = _ids(spec, seed=1)
    logits = torch_logits(model, ids)
    with model.disable_adapter():
        assert _error(torch_logits(model, ids), logits) > 1e-3  # the adapter matters
    merged = {k: v.float().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    return out, ids, logits, merged


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_peft_adapter_gives_peft_s_logits(peft_adapter, backend):
    adapter_dir, ids, reference, _ = peft_adapter
    model = api.load(str(MODEL_DIR), adapter=adapter_dir, backend=backend)
    assert _error(model.logits(ids), reference) < 1e-5


def test_a_peft_adapter_merges_as_peft_merges(peft_adapter, tiny):
    adapter_dir, _, _, peft_merged = peft_adapter
    spec, weights = tiny
    method, state = load_adapter(adapter_dir, spec)
    assert method.name == "vera" and method.r == 8 and method.projection_prng_key == 3
    merged = method.merge(BaseModel(spec, weights), state)
    for layer in TARGETS:
        name = f"transformer.h.1.{'attn.attention.' if layer.endswith('_proj') and layer != 'c_proj' else 'mlp.'}{layer}.weight"
        assert np.abs(merged[name] - weights[name]).max() > 1e-4  # the update is there
    for name, value in merged.items():
        np.testing.assert_allclose(value, peft_merged[name], rtol=0, atol=1e-5 * np.abs(peft_merged[name]).max())


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_trained_twintune_adapter_gives_its_logits_in_peft(backend, tmp_path):
    from peft import PeftModel

    run = prepare(_recipe(), backend)
    for step in range(4):
        train_step(run, step)
    state = run.backend.trainable_state()
    adapter_dir = save_adapter(tmp_path / "adapter", run.method, state, run.recipe.model, spec=run.spec)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] and config["projection_prng_key"] == 3
    peft_model = PeftModel.from_pretrained(hf_model(run.model_dir), str(adapter_dir)).eval()
    ids = _ids(run.spec)
    reference = torch_logits(peft_model, ids)
    assert _error(run.backend.logits(ids), reference) < 1e-5
    method, loaded = load_adapter(adapter_dir, run.spec)  # and back, bit for bit
    assert method.to_dict() == {**run.method.to_dict(), "target_modules": sorted(TARGETS)}
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_projections_that_are_not_the_key_s_are_refused(tiny, tmp_path):
    spec, weights = tiny
    method = _recipe().method
    state = {k: v + 0.1 for k, v in method.plan(BaseModel(spec, weights), 0).initial_values().items()}
    good = save_adapter(tmp_path / "good", method, state, str(MODEL_DIR), spec=spec)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    assert set(tensors) >= {"base_model.vera_A", "base_model.vera_B"}
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.01
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(TwintuneError, match="'base_model.vera_A' is not the one its VeRA settings draw"):
        load_adapter(bad, spec)


def test_vera_lives_in_its_own_files():
    """The skeleton's promise (issue 27): a method with a new kind of layer is its file and one layer file
    per backend; nothing else under twintune/ names it."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "twintune"
    naming = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                    if re.search(r"\bvera\b", path.read_text(), re.IGNORECASE))
    assert naming == ["backends/mlx/methods/vera.py", "backends/torch/methods/vera.py", "methods/vera.py"]
