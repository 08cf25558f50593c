"""The memory estimator's counting, and `twintune estimate` on the command line."""

import json

import numpy as np
import pytest

from twintune.cli import main
from twintune.formats.checkpoint import load_config
from twintune.memory import FLOAT32, estimate_memory, estimate_recipe, quantized_bytes
from twintune.methods import BaseModel, LoRA
from twintune.models import GPTNeoSpec
from twintune.quant import Quantization
from twintune.quant.nf4 import quantize_nf4

SPEC = GPTNeoSpec.from_config(load_config("builtin:tiny-gpt-neo"))
ALL = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")


@pytest.mark.parametrize("shape", [(64, 64), (33, 17), (256, 1024)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_are_what_the_quantizer_stores(shape, double_quant):
    weight = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    stored = quantize_nf4(weight, double_quant=double_quant).nbytes
    assert quantized_bytes(weight.size, Quantization("nf4", double_quant=double_quant)) == stored


def test_affine_bytes():
    assert quantized_bytes(4096, Quantization("affine", bits=4, group_size=64)) == 4096 // 2 + 64 * 8


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_weights_and_trainable_state_are_counted_exactly(backend):
    lora = LoRA(r=8, target_modules=ALL)
    estimate = estimate_memory(SPEC, lora, None, batch_size=4, sequence_length=32, backend=backend)
    n_weights = sum(int(np.prod(s)) for s in SPEC.weight_shapes().values())
    assert estimate.frozen_weights == n_weights * FLOAT32
    init = lora.init_values(SPEC.linear_layers(), seed=0)
    assert estimate.trainable_parameters == sum(v.size for v in init.values())
    assert estimate.trainable == estimate.trainable_parameters * 4 * FLOAT32  # the value, its gradient, AdamW's m, v


def test_quantizing_shrinks_the_weights_and_more_tokens_more_activations():
    lora = LoRA(r=8)
    plain = estimate_memory(SPEC, lora, None, 4, 32, "mlx")
    nf4 = estimate_memory(SPEC, lora, Quantization("nf4"), 4, 32, "mlx")
    assert nf4.frozen_weights < plain.frozen_weights and nf4.loading > nf4.frozen_weights
    longer = estimate_memory(SPEC, lora, None, 4, 64, "mlx")
    assert longer.activations > 2 * plain.activations  # attention probabilities grow with length squared on MLX
    more_targets = estimate_memory(SPEC, LoRA(r=8, target_modules=ALL), None, 4, 32, "mlx")
    assert more_targets.activations > plain.activations


def test_cli_estimate(capsys):
    assert main(["estimate", "recipes/demo-financial-sentiment.yaml", "--backend", "torch", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["training peak"] == pytest.approx(sum(rows[k] for k in ("frozen weights", "trainable + optimizer",
                                                                        "activations", "transient")), abs=0.2)
    assert main(["estimate", "recipes/demo-financial-sentiment.yaml", "--tokens", "64"]) == 0
    assert "x 64 tokens" in capsys.readouterr().out


def test_cli_estimate_refuses_bad_input(capsys, tmp_path):
    assert main(["estimate", str(tmp_path / "missing.yaml")]) == 2
    assert main(["estimate", "recipes/demo-financial-sentiment.yaml", "--set", f"model={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("twintune: error:") == 2 and "Traceback" not in err


def test_checkpointing_keeps_one_array_per_block():
    lora = LoRA(r=8)
    plain = estimate_memory(SPEC, lora, None, 4, 32, "mlx")
    saved = estimate_memory(SPEC, lora, None, 4, 32, "mlx", gradient_checkpointing=True)
    assert saved.activations == 4 * 32 * (SPEC.num_layers + 3) * SPEC.hidden_size * FLOAT32
    assert saved.training_peak < plain.training_peak


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_low_precision_base_halves_the_weights_but_not_the_trainable_state(dtype):
    lora = LoRA(r=8, target_modules=ALL)
    full = estimate_memory(SPEC, lora, None, 4, 32, "torch")
    half = estimate_memory(SPEC, lora, None, 4, 32, "torch", dtype=dtype)
    assert half.frozen_weights * 2 == full.frozen_weights
    assert half.trainable == full.trainable
    assert 0.5 * full.activations < half.activations < full.activations  # the attention and adapters stay float32
    nf4 = estimate_memory(SPEC, lora, Quantization("nf4"), 4, 32, "torch", dtype=dtype)
    assert nf4.frozen_weights < half.frozen_weights
    affine = Quantization("affine", bits=4, group_size=64)
    assert quantized_bytes(4096, affine, 2) == 4096 // 2 + 64 * 4  # scales and biases in the dtype


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_float64_doubles_everything(backend):
    """float64 holds the weights, the trainable state, the attention and every activation in 8 bytes."""
    lora = LoRA(r=8, target_modules=ALL)
    single = estimate_memory(SPEC, lora, None, 4, 32, backend)
    double = estimate_memory(SPEC, lora, None, 4, 32, backend, dtype="float64")
    assert double.frozen_weights == 2 * single.frozen_weights and double.trainable == 2 * single.trainable
    assert abs(double.activations - 2 * single.activations) <= 2 and abs(double.transient - 2 * single.transient) <= 2


def test_cli_estimate_follows_the_recipe_dtype(capsys):
    assert main(["estimate", "recipes/demo-financial-sentiment.yaml", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["estimate", "recipes/demo-financial-sentiment.yaml", "--set", "dtype=bfloat16", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["frozen weights"] == pytest.approx(full["frozen weights"] / 2, abs=0.1)


def test_every_method_is_counted_from_its_plan():
    from twintune.formats.checkpoint import load_checkpoint
    from twintune.methods import METHODS, BaseModel
    from twintune.models import gpt_neo_weights

    weights = gpt_neo_weights(SPEC, load_checkpoint("builtin:tiny-gpt-neo").weights)
    model_bytes = sum(w.size for w in weights.values()) * FLOAT32
    estimates = {}
    for name, cls in METHODS.items():
        method = cls()
        estimate = estimate_memory(SPEC, method, None, 4, 32, "torch")
        assert estimate.trainable_parameters == method.plan(BaseModel(SPEC, weights), seed=0).trainable_parameters()
        assert estimate.trainable == estimate.trainable_parameters * 4 * FLOAT32  # the value, its gradient, AdamW's m, v
        assert estimate.loading == model_bytes  # the whole float32 model is read, whatever trains
        estimates[name] = estimate
    # an unfrozen weight is counted once, as trainable, not also as frozen
    assert estimates["full"].frozen_weights == 0
    assert estimates["bitfit"].frozen_weights + estimates["bitfit"].trainable_parameters * FLOAT32 == model_bytes
    # the backward stops at the lowest trained block: the last 2 of 4 keep about half of what full keeps
    assert estimates["last_blocks"].activations < 0.6 * estimates["full"].activations


@pytest.mark.parametrize("recipe", ["recipes/gpt-neo-1.3b-financial-sentiment-lora.yaml",
                                    "recipes/gpt-neo-1.3b-financial-sentiment-qlora.yaml",
                                    "recipes/gpt-neo-1.3b-financial-sentiment-full-8bit.yaml"])
def test_the_flagship_recipes_estimate_with_the_hub_unreachable(recipe, capsys, monkeypatch):
    """GPT-Neo 1.3B's architecture ships with twintune (assets/configs): the estimate reads nothing else."""
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("the network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert main(["estimate", recipe, "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["training peak"] > 1000  # MB: a 1.3B model's
    assert main(["estimate", recipe, "--set", "model=EleutherAI/gpt-neo-20B"]) == 2
    assert ("cannot reach the Hugging Face hub to download model 'EleutherAI/gpt-neo-20B' (ConnectionError); pass a "
            "local directory with its config.json (all that is read here) instead.") in capsys.readouterr().err


def test_the_shipped_configs_are_the_architectures_transformers_builds():
    from transformers import GPTNeoConfig

    spec = GPTNeoSpec.from_config(load_config("EleutherAI/gpt-neo-1.3B"))
    reference = GPTNeoConfig()  # transformers' defaults are GPT-Neo 1.3B's
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.vocab_size, spec.max_positions) == (
        reference.hidden_size, reference.num_layers, reference.num_heads, reference.vocab_size,
        reference.max_position_embeddings)


def test_each_optimizers_state_is_counted():
    """Full fine-tuning: the value and its gradient (float32), plus the optimizer's state per value."""
    from twintune.methods import Full
    from twintune.optimizers import optimizer_from_dict

    full = Full()
    shapes = full.shapes(BaseModel(SPEC, {}))
    values = sum(int(np.prod(s)) for s in shapes.values())
    for name, per_value in (("adamw", 8), ("adamw8bit", None), ("lion", 4), ("sgd", 0), ("adafactor", None)):
        optimizer = optimizer_from_dict({"name": name})
        estimate = estimate_memory(SPEC, full, None, 4, 32, "torch", optimizer=optimizer)
        state = sum(optimizer.state_bytes(tuple(s)) for s in shapes.values())
        assert estimate.trainable == values * 2 * FLOAT32 + state, name
        if per_value is not None:
            assert state == values * per_value, name
    # bfloat16: the value, its gradient and its compensation take 2 bytes each, the optimizer's state as before
    half = estimate_memory(SPEC, full, None, 4, 32, "torch", optimizer=optimizer_from_dict({"name": "adamw"}),
                           dtype="bfloat16")
    assert half.trainable == values * (3 * 2 + 8)
    # the tiny model's values are all 8-bit-sized but the position embeddings' and norms' (under 4096 values)
    eight_bit = estimate_memory(SPEC, full, None, 4, 32, "torch", optimizer=optimizer_from_dict({"name": "adamw8bit"}))
    adamw = estimate_memory(SPEC, full, None, 4, 32, "torch")
    assert (eight_bit.trainable - values * 8) < 0.3 * (adamw.trainable - values * 8)


def test_full_fine_tuning_of_the_13b_model_with_8bit_adamw_is_estimated_inside_16_gb(capsys):
    """Every value of GPT-Neo 1.3B trains in bfloat16 (value, gradient, compensation: 6 bytes) with ~2
    bytes of 8-bit AdamW state: 10.1 GiB at the recipe's batch (12.8 in float32), where AdamW's 8 bytes
    would make 17.4."""
    recipe = "recipes/gpt-neo-1.3b-financial-sentiment-full-8bit.yaml"
    assert main(["estimate", recipe, "--json"]) == 0
    peak = json.loads(capsys.readouterr().out)["training peak"]
    assert 10000 < peak < 11000
    assert main(["estimate", recipe, "--json", "--set", "dtype=float32"]) == 0
    assert 12000 < json.loads(capsys.readouterr().out)["training peak"] < 16 * 1024
    assert main(["estimate", recipe, "--json", "--set", "train.optimizer.name=adamw"]) == 0
    assert json.loads(capsys.readouterr().out)["training peak"] > 16 * 1024


# ---- train.memory_limit_gb -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_run_over_its_memory_limit_fails_before_its_first_step(backend, tmp_path, capsys):
    """The demo's estimated peak is 47 MB on torch (more on MLX): a 0.01 GB limit refuses it, with the
    estimate, before the model loads (no run directory is made)."""
    argv = ["train", "recipes/demo-financial-sentiment.yaml", "--backend", backend, "--out", str(tmp_path / "run"),
            "--set", "train.memory_limit_gb=0.01", "--no-progress"]
    assert main(argv) == 2
    peak = estimate_recipe("recipes/demo-financial-sentiment.yaml", backend=backend)[0][4]
    assert peak[0] == "training peak"
    assert capsys.readouterr().err.strip() == (
        f"twintune: error: this run's training peak is estimated at {peak[1] / 1024:.2f} GB, above "
        "train.memory_limit_gb (0.01 GB): lower train.batch_size or data.max_length, set "
        "train.gradient_checkpointing, quantize the base, or raise the limit (twintune estimate shows where the "
        "memory goes).")
    assert not (tmp_path / "run").exists()


def test_a_run_under_its_memory_limit_holds_mlxs_allocator_to_it(tmp_path):
    import mlx.core as mx

    from twintune.recipe import load_recipe
    from twintune.train.loop import train

    before = mx.set_memory_limit(2**40)
    try:
        train(load_recipe("recipes/demo-financial-sentiment.yaml", ["train.memory_limit_gb=1.5", "train.max_steps=2"]),
              "mlx", tmp_path / "run", progress=False)
        assert mx.set_memory_limit(before) == int(1.5 * 2**30)  # (it returns the limit it replaces)
    finally:
        mx.set_memory_limit(before)


def test_estimate_compares_the_peak_with_the_limit(capsys):
    recipe = "recipes/gpt-neo-1.3b-financial-sentiment-full-8bit.yaml"
    assert main(["estimate", recipe, "--set", "train.memory_limit_gb=8"]) == 0
    assert "the training peak is 2.12 GB over train.memory_limit_gb (8 GB): the run would be refused" in \
        capsys.readouterr().out
    assert main(["estimate", recipe, "--set", "train.memory_limit_gb=16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["memory limit"] == 16384.0 and rows["training peak"] < rows["memory limit"]
