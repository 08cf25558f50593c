"""LoReFT's own properties, on both backends: R stays orthonormal while it trains, W = R with b = 0
is the identity, only the chosen prompt positions change and they change by the formula
h + Rᵀ(W h + b − R h), and the recipe mistakes are refused with a sentence.

The shared standard (parameter count, MLX-vs-torch steps, saving, resume, merge refused) is in
tests/methods/test_methods.py.
"""

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_unflatten

from twintune.backends.mlx.methods import loreft as mlx_loreft
from twintune.backends.torch.methods import loreft as torch_loreft
from twintune.data.batching import Encoded, make_batch
from twintune.errors import TwintuneError
from twintune.formats.checkpoint import load_checkpoint
from twintune.methods import BaseModel, method_from_dict
from twintune.methods.loreft import LoReFT, LoReFTLayer, orthonormal_rows
from twintune.models import GPTNeoSpec
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step

BACKENDS = ["mlx", "torch"]
SLOT = "transformer.h.1.intervention"


@pytest.fixture(scope="module")
def spec() -> GPTNeoSpec:
    return GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)


def slot_values(method: LoReFT, spec: GPTNeoSpec) -> tuple[dict[str, np.ndarray], LoReFTLayer]:
    """The initial values (names relative to the slot) and the layer settings of block 1's intervention."""
    surgery = method.plan(BaseModel(spec, {}), seed=3).inserted()[SLOT]
    return {name.removeprefix(SLOT + "."): value for name, value in surgery.values.items()}, surgery.layer


def intervene(backend: str, values: dict[str, np.ndarray], options: LoReFTLayer, x: np.ndarray,
              prompt_lengths) -> np.ndarray:
    """The backend's intervention module, given these values (as the INSERT surgery gives them), applied to x."""
    if backend == "mlx":
        own = {name: mx.array(value) for name, value in values.items()}
        module = mlx_loreft.LoReFTIntervention(own, options)
        module.update(tree_unflatten(list(own.items())))
        module.eval()
        lengths = None if prompt_lengths is None else mx.array(prompt_lengths)
        return np.array(module(mx.array(x), lengths))
    own = {name: torch.from_numpy(value) for name, value in values.items()}
    module = torch_loreft.LoReFTIntervention(own, options)
    module.load_state_dict(own, strict=False, assign=True)
    module.eval()
    lengths = None if prompt_lengths is None else torch.from_numpy(prompt_lengths)
    with torch.no_grad():
        return module(torch.from_numpy(x), lengths).numpy()


def numpy_loreft(h: np.ndarray, values: dict[str, np.ndarray], part: str = "") -> np.ndarray:
    """h + Rᵀ(W h + b − R h) for row vectors h, R the orthonormalised rotate_layer."""
    R = orthonormal_rows(values[part + "rotate_layer"].astype(np.float64))
    W, b = values[part + "learned_source.weight"], values[part + "learned_source.bias"]
    return h + (h @ W.T + b - h @ R.T) @ R


def test_the_numpy_orthonormalisation_is_the_q_of_a_qr_with_positive_diagonal():
    matrix = np.random.default_rng(0).normal(size=(5, 64))
    q, upper = np.linalg.qr(matrix.T)
    np.testing.assert_allclose(orthonormal_rows(matrix), (q * np.sign(np.diag(upper))).T, atol=1e-12)
    already = orthonormal_rows(matrix)
    np.testing.assert_allclose(orthonormal_rows(already), already, atol=1e-14)  # orthonormal rows stay as they are


@pytest.mark.parametrize("backend", BACKENDS)
def test_R_stays_orthonormal_while_it_trains(backend):
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", [
        "method={name: loreft, r: 4, layers: [1, 2], positions: f2+l2}", "data.synthetic_size=60",
        "train.batch_size=2", "train.lr=1e-2", "train.max_steps=50", "train.warmup_steps=0"])
    run = prepare(recipe, backend)
    for step in range(50):
        train_step(run, step)
    state = run.backend.trainable_state()
    for block in (1, 2):  # (the last block's first positions reach no prediction: they would not train)
        module = run.backend.model.transformer.h[block].intervention
        for part, held in (("", module), ("last.", module.last)):
            raw = state[f"transformer.h.{block}.intervention.{part}rotate_layer"]
            if backend == "mlx":
                R = np.array(mlx_loreft.orthonormal_rows(held.rotate_layer))
            else:
                with torch.no_grad():
                    R = torch_loreft.orthonormal_rows(held.rotate_layer).numpy()
            assert np.abs(raw @ raw.T - np.eye(4)).max() > 1e-3  # the trained value itself left the orthonormal set
            assert np.abs(R @ R.T - np.eye(4)).max() < 1e-5  # the R the intervention uses did not
            saved = run.method.saved_values(state)[f"transformer.h.{block}.intervention.{part}rotate_layer"]
            np.testing.assert_allclose(saved, R, atol=1e-5)  # the adapter file holds that R


@pytest.mark.parametrize("backend", BACKENDS)
def test_W_equal_to_R_and_b_zero_is_the_identity(backend, spec):
    values, options = slot_values(LoReFT(r=4, positions="f3+l3", share_weights=True), spec)
    values["learned_source.weight"] = values["rotate_layer"].copy()  # drawn orthonormal
    values["learned_source.bias"] = np.zeros_like(values["learned_source.bias"])
    x = np.random.default_rng(1).normal(size=(2, 8, spec.hidden_size)).astype(np.float32)
    np.testing.assert_allclose(intervene(backend, values, options, x, None), x, atol=1e-5)
    values["learned_source.bias"][0] = 1.0  # not a no-op test: a bias moves the chosen positions by R's first row
    moved = intervene(backend, values, options, x, None) - x
    np.testing.assert_allclose(moved[:, [0, 1, 2, 5, 6, 7]], np.broadcast_to(values["rotate_layer"][0], (2, 6, 64)),
                               atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_chosen_prompt_positions_change_and_by_the_formula(backend, spec):
    method = LoReFT(r=2, positions="f1+l2", share_weights=False)
    values, options = slot_values(method, spec)
    rng = np.random.default_rng(2)
    for part in ("", "last."):  # trained-looking values: R off the orthonormal set, W and b not small
        values[part + "rotate_layer"] = values[part + "rotate_layer"] + 0.3 * rng.normal(size=(2, 64)).astype(np.float32)
        values[part + "learned_source.bias"] = rng.normal(size=2).astype(np.float32)
    # a right-padded batch: prompts of 7, 4 and 3 tokens, each followed by a one-token label
    batch = make_batch([Encoded(np.arange(n + 1, dtype=np.int32), n, 0) for n in (7, 4, 3)])
    lengths = batch.prompt_lengths
    assert lengths.tolist() == [7, 4, 3] and batch.input_ids.shape == (3, 8)
    x = rng.normal(size=(3, 8, spec.hidden_size)).astype(np.float32)
    out = intervene(backend, values, options, x, lengths)
    for row, n in enumerate(lengths):
        changed = sorted(np.flatnonzero(np.abs(out[row] - x[row]).max(axis=-1) > 0).tolist())
        assert changed == [0, n - 2, n - 1]  # the first prompt token and the last two; never the label or padding
        np.testing.assert_allclose(out[row, 0], numpy_loreft(x[row, 0], values), atol=1e-5)
        np.testing.assert_allclose(out[row, n - 2:n], numpy_loreft(x[row, n - 2:n], values, "last."), atol=1e-5)
    # without prompt lengths (logits of plain ids), each whole row is its prompt
    whole = intervene(backend, values, options, x, None)
    assert sorted(np.flatnonzero(np.abs(whole[0] - x[0]).max(axis=-1) > 0).tolist()) == [0, 6, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_weights_use_one_intervention_at_every_chosen_position(backend, spec):
    values, options = slot_values(LoReFT(r=2, positions="f2+l1", share_weights=True), spec)
    assert sorted(values) == ["learned_source.bias", "learned_source.weight", "rotate_layer"]
    x = np.random.default_rng(4).normal(size=(1, 6, spec.hidden_size)).astype(np.float32)
    out = intervene(backend, values, options, x, np.array([5], np.int32))
    np.testing.assert_allclose(out[0, [0, 1, 4]], numpy_loreft(x[0, [0, 1, 4]], values), atol=1e-5)
    np.testing.assert_array_equal(out[0, [2, 3, 5]], x[0, [2, 3, 5]])


def test_the_parameters_are_pyreft_s_names_and_shapes(spec):
    shapes = LoReFT(r=3, layers=[2], positions="f1+l1").shapes(BaseModel(spec, {}))
    assert shapes == {f"transformer.h.2.intervention.{part}{name}": shape for part in ("", "last.")
                      for name, shape in (("rotate_layer", (3, 64)), ("learned_source.weight", (3, 64)),
                                          ("learned_source.bias", (3,)))}
    R = LoReFT(r=3).plan(BaseModel(spec, {}), seed=0).initial_values()["transformer.h.0.intervention.rotate_layer"]
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)  # drawn orthonormal, as pyreft's orthogonal_ init
    assert LoReFT(positions="l3").plan(BaseModel(spec, {}), seed=0).trainable_parameters() == 4 * (4 * 64 * 2 + 4)


@pytest.mark.parametrize("raw, match", [
    ({"positions": "first1"}, "must be f<N>+l<M>, f<N> or l<M>"),
    ({"positions": "f0+l0"}, "must be f<N>+l<M>, f<N> or l<M>"),
    ({"positions": "l1+f1"}, "must be f<N>+l<M>, f<N> or l<M>"),
    ({"r": 0}, "'method.r' must be a positive rank"),
    ({"layers": [-1]}, "must list block numbers >= 0"),
    ({"dropout": 1.0}, "must be in [0, 1)"),
])
def test_bad_keys_are_refused_with_a_sentence(raw, match):
    with pytest.raises(TwintuneError, match=re.escape(match)):
        method_from_dict({"name": "loreft", **raw})


def test_what_a_model_cannot_take_is_refused_with_a_sentence(spec):
    base = BaseModel(spec, {})
    with pytest.raises(TwintuneError, match=r"names block 4, but this model has 4 blocks \(0-3\)"):
        LoReFT(layers=[1, 4]).plan(base, seed=0)
    with pytest.raises(TwintuneError, match="rank r=65 is larger than the model's width 64"):
        LoReFT(r=65).plan(base, seed=0)
    with pytest.raises(TwintuneError, match="this model is not a GPT-Neo"):
        LoReFT().plan(BaseModel(object(), {}), seed=0)
    assert LoReFT(positions="f3+l2").prompt_problem(5) is None
    assert "fewer than the 5" in LoReFT(positions="f3+l2").prompt_problem(4)
