"""Bottleneck adapters: they start at the base model, and each style computes AdapterHub's bottleneck.

The reference here is a plain numpy transcription of AdapterHub's (`adapters` 1.2) bottleneck on
its GPT-2 block, which calls `bottleneck_layer_forward(sublayer_output, residual, layer_norm=None)`:
`Adapter.pre_forward`, `forward` and `post_forward` with the flags of `SeqBnConfig` (pfeiffer) and
`DoubleSeqBnConfig` (houlsby). Shared tests (tests/methods/test_methods.py) cover the rest:
parameter counts, cross-backend steps, saving, resuming, merge refused.
"""

import numpy as np
import pytest

from twintune.dropout import dropout_key, dropout_masks, keep_mask
from twintune.methods import BaseModel
from twintune.recipe import load_recipe
from twintune.train.build import prepare

BACKENDS = ["mlx", "torch"]

# The flags of AdapterHub's configs that decide where a bottleneck reads and adds (both leave
# scaling at 1.0, gating and adapter LayerNorms off); the slots the config's mh_adapter and
# output_adapter fill.
CONFIGS = {
    "houlsby": {"original_ln_before": False, "residual_before_ln": True, "original_ln_after": True,
                "slots": ("attn_adapter", "mlp_adapter")},
    "pfeiffer": {"original_ln_before": True, "residual_before_ln": True, "original_ln_after": True,
                 "slots": ("mlp_adapter",)},
}
NUMPY_ACTIVATIONS = {
    "relu": lambda h: np.maximum(h, 0.0),
    "swish": lambda h: h / (1.0 + np.exp(-h)),
    "gelu_new": lambda h: 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3))),
    "tanh": np.tanh,
}


def adapterhub_bottleneck(s: np.ndarray, x: np.ndarray, values: dict, config: dict, activation: str) -> np.ndarray:
    """BottleneckLayer.bottleneck_layer_forward(s, x, layer_norm=None) with one adapter, in eval mode."""
    # Adapter.pre_forward(hidden_states=s, input_tensor=x, layer_norm=None)
    hidden = s
    residual = s if config["residual_before_ln"] is True else None
    if config["original_ln_before"]:
        hidden = hidden + x  # no layer_norm given: the sum only
    if not config["residual_before_ln"]:
        residual = hidden
    # Adapter.forward(hidden, residual_input=residual): up(act(down(hidden))) * 1.0, dropout off, + residual
    down = NUMPY_ACTIVATIONS[activation](hidden @ values["down.weight"].T + values["down.bias"])
    output = down @ values["up.weight"].T + values["up.bias"] + residual
    # Adapter.post_forward(output, s, x, layer_norm=None)
    if config["original_ln_after"]:
        output = output + x
    return output


def adapter_run(backend: str, method: str, dtype: str = "float32"):
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", [f"method={method}", f"dtype={dtype}"])
    return prepare(recipe, backend, with_data=False)


def token_ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 1024, (2, 24)).astype(np.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_the_initial_model_is_the_base_model_exactly(style, backend):
    run = adapter_run(backend, f"{{name: adapter, style: {style}, dropout: 0.1}}")
    adapted = run.backend.logits(token_ids())
    run.backend.undo_method(run.plan, BaseModel(run.spec, {}))  # the slots empty again: the base model
    assert np.array_equal(adapted, run.backend.logits(token_ids()))


def _block_functions(run, backend: str):
    """(block 1 of the run's model, its attention sublayer, its MLP sublayer) as numpy -> numpy functions."""
    block = run.backend.model.transformer.h[1]
    if backend == "mlx":
        import mlx.core as mx

        call = lambda f, x: np.array(f(mx.array(x, dtype=mx.float64)))  # mx.array alone would make float32
    else:
        import torch

        def call(f, x):
            with torch.no_grad():
                return f(torch.from_numpy(x)).numpy()

    return (lambda x: call(block, x), lambda x: call(lambda h: block.attn(block.ln_1(h)), x),
            lambda x: call(lambda h: block.mlp(block.ln_2(h)), x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style, non_linearity, activation", [("houlsby", "default", "swish"),
                                                              ("pfeiffer", "default", "relu"),
                                                              ("houlsby", "gelu_new", "gelu_new"),
                                                              ("pfeiffer", "tanh", "tanh")])
def test_a_block_computes_adapterhubs_bottleneck(style, non_linearity, activation, backend):
    """Block 1 with non-trivial adapter values against the numpy transcription, in float64: the
    sublayers are the model's own, the adapters' arithmetic and placement are AdapterHub's."""
    run = adapter_run(backend, f"{{name: adapter, style: {style}, non_linearity: {non_linearity}, "
                               "reduction_factor: 8}", dtype="float64")
    rng = np.random.default_rng(5)
    state = {name: rng.normal(0.0, 0.5, value.shape) for name, value in run.backend.trainable_state().items()}
    run.backend.set_trainable_state(state)
    config = CONFIGS[style]
    assert {name.split(".")[3] for name in state} == set(config["slots"])
    values = {slot: {part: state[f"transformer.h.1.{slot}.{part}"] for part in
                     ("down.weight", "down.bias", "up.weight", "up.bias")} for slot in config["slots"]}
    block, attention, mlp = _block_functions(run, backend)

    x0 = rng.normal(0.0, 1.0, (2, 6, 64))
    s = attention(x0)
    x = adapterhub_bottleneck(s, x0, values["attn_adapter"], config, activation) if "attn_adapter" in values else x0 + s
    s = mlp(x)
    expected = adapterhub_bottleneck(s, x, values["mlp_adapter"], config, activation)
    got = block(x0)
    assert np.abs(got - (x + s)).max() > 0.1  # the adapters change the block's output: not a comparison of no-ops
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def _call_in_training(module, backend: str, key: int, s: np.ndarray, x: np.ndarray) -> np.ndarray:
    """module(s, x) in training mode, drawing its dropout masks from `key`."""
    module.train()
    if backend == "mlx":
        import mlx.core as mx

        with dropout_masks(mx.array(key, dtype=mx.uint32)):
            return np.array(module(mx.array(s, dtype=mx.float64), mx.array(x, dtype=mx.float64)))
    import torch

    with torch.no_grad(), dropout_masks(torch.tensor(key, dtype=torch.int64)):
        return module(torch.from_numpy(s), torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_drops_the_bottlenecks_output_as_adapterhub_does(backend):
    """AdapterHub's Adapter.forward applies its dropout to up(act(down(h))), before the residuals;
    the mask is the shared generator's for the slot's name, so both backends drop the same elements."""
    run = adapter_run(backend, "{name: adapter, style: houlsby, dropout: 0.5}", dtype="float64")
    rng = np.random.default_rng(8)
    state = {name: rng.normal(0.0, 0.5, value.shape) for name, value in run.backend.trainable_state().items()}
    run.backend.set_trainable_state(state)
    slot = "transformer.h.2.mlp_adapter"
    values = {part: state[f"{slot}.{part}"] for part in ("down.weight", "down.bias", "up.weight", "up.bias")}
    s, x = rng.normal(0.0, 1.0, (2, 5, 64)), rng.normal(0.0, 1.0, (2, 5, 64))
    key = dropout_key(0, 3, 0)
    got = _call_in_training(run.backend.model.transformer.h[2].mlp_adapter, backend, key, s, x)

    update = adapterhub_bottleneck(s, x, values, CONFIGS["houlsby"], "swish") - x - s
    keep = keep_mask(key, slot, update.shape, 0.5)
    assert 0.4 < keep.mean() < 0.6
    np.testing.assert_allclose(got, x + s + np.where(keep, update / 0.5, 0.0), rtol=1e-12, atol=1e-12)
