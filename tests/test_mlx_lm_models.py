"""The MLX backend training mlx-lm models (llama and gpt2 families) with our LoRA and step."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import gpt2, llama

from model_helpers import LLAMA, write_tiny_llama
from twintune.optimizers import AdamW
from twintune.backends.mlx.backend import MLXBackend
from twintune.backends.mlx.mlx_lm_model import MLXLMModel, SwiGLUMLP, load_mlx_lm_model, swiglu
from twintune.data.batching import Batch
from twintune.errors import TwintuneError
from twintune.methods import BaseModel, LoRA

GPT2 = dict(model_type="gpt2", n_ctx=64, n_embd=32, n_head=4, n_layer=2, n_positions=64, layer_norm_epsilon=1e-5,
            vocab_size=300)


def _llama():
    mx.random.seed(1)
    return llama.Model(llama.ModelArgs(**LLAMA))


def _gpt2():
    mx.random.seed(2)
    return gpt2.Model(gpt2.ModelArgs(**GPT2))


def _batch(seed=0, rows=4, width=10, vocab=300):
    ids = np.random.default_rng(seed).integers(1, vocab, (rows, width)).astype(np.int32)
    positions = (np.arange(rows) * width + width - 2).astype(np.int32)
    return Batch(input_ids=ids, target_positions=positions, targets=ids[:, -1].copy(), answer_positions=positions,
                 labels=np.zeros(rows, np.int32), lengths=np.full(rows, width))


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_wrapped_model_gives_mlx_lm_logits(make):
    inner = make()
    ids = _batch().input_ids
    expected = np.array(inner(mx.array(ids)))
    backend = MLXBackend.from_model(MLXLMModel(inner))
    np.testing.assert_allclose(backend.logits(ids), expected, rtol=1e-5, atol=1e-5)
    assert backend.spec.vocab_size == 300


def test_swiglu_mlps_are_swapped_for_the_lean_one_under_the_same_names():
    inner = _llama()
    names = [name for name, _ in tree_flatten(inner.parameters())]
    ids = mx.array(_batch().input_ids)
    expected = inner(ids)
    model = MLXLMModel(inner)
    assert all(type(layer.mlp) is SwiGLUMLP for layer in model.model.layers)
    assert [name for name, _ in tree_flatten(inner.parameters())] == names
    model.train()
    assert mx.array_equal(model.lm_head(model(ids)), expected)  # op for op mlx-lm's forward
    gpt2_model = MLXLMModel(_gpt2())  # gelu MLPs are not swiglu: left alone
    assert type(gpt2_model.model.h[0].mlp) is gpt2.MLP

    class Doubled(llama.MLP):  # a forward other than swiglu's exact line is not swapped
        def __call__(self, x):
            return 2 * super().__call__(x)

    inner = _llama()
    inner.model.layers[0].mlp = Doubled(llama.ModelArgs(**LLAMA))
    assert [type(layer.mlp) for layer in MLXLMModel(inner).model.layers] == [Doubled, SwiGLUMLP]


@pytest.mark.parametrize("dtype, tolerance", [(mx.float32, 1e-6), (mx.float64, 1e-13)])
def test_lean_swiglu_gradients_equal_the_formula(dtype, tolerance):
    rng = np.random.default_rng(0)
    gate_np, up_np, weights_np = 4 * rng.standard_normal((2, 3, 40)), rng.standard_normal((2, 3, 40)), rng.standard_normal((2, 3, 40))
    gate, up, weights = (mx.array(a, dtype=dtype) for a in (gate_np, up_np, weights_np))
    value, (d_gate, d_up) = mx.value_and_grad(lambda g, u: (swiglu(g, u) * weights).sum(), argnums=(0, 1))(gate, up)
    sigmoid = np.array(mx.sigmoid(gate))  # MLX's own (float32-accurate even in float64, as mlx-lm's forward)
    silu = gate_np * sigmoid
    np.testing.assert_allclose(value.item(), (silu * up_np * weights_np).sum(), rtol=tolerance)
    np.testing.assert_allclose(np.array(d_gate), weights_np * up_np * (sigmoid + silu * (1 - sigmoid)), rtol=tolerance,
                               atol=tolerance)
    np.testing.assert_allclose(np.array(d_up), weights_np * silu, rtol=tolerance, atol=tolerance)
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu  # and equal to differentiating mlx-lm's

    expected = mx.grad(lambda g, u: (mlx_lm_swiglu(g, u) * weights).sum(), argnums=(0, 1))(gate, up)
    for ours, theirs in zip((d_gate, d_up), expected):
        np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=max(tolerance, 1e-12), atol=tolerance)


def test_lean_swiglu_keeps_two_arrays_where_mlx_lm_keeps_four():
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    tokens, width, blocks = 256, 2048, 8
    x = mx.random.normal((tokens, 64))
    gate, up, down = mx.random.normal((64, width)), mx.random.normal((64, width)), mx.random.normal((width, 64)) / width
    mx.eval(x, gate, up, down)

    def peak_bytes(act):  # a residual stream through 8 MLPs: the backward starts after the last
        def loss(h):
            for _ in range(blocks):
                h = h + act(h @ gate, h @ up) @ down
            return h.sum()
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(mx.grad(loss)(x))
        return mx.get_peak_memory() - before

    one_array_per_block = tokens * width * 4 * blocks
    assert peak_bytes(mlx_lm_swiglu) - peak_bytes(swiglu) >= 1.5 * one_array_per_block


def test_spec_lists_the_block_linear_layers():
    spec = MLXBackend.from_model(MLXLMModel(_llama())).spec
    layers = spec.linear_layers()
    assert len(layers) == 2 * 7 and "lm_head" not in layers
    assert layers["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert layers["model.layers.1.self_attn.k_proj"] == (16, 32)  # 2 key/value heads of 8
    assert layers["model.layers.0.mlp.down_proj"] == (32, 64)
    assert set(spec.LINEAR_NAMES) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("make, targets", [(_llama, ("q_proj", "v_proj")), (_gpt2, ("c_attn",))])
def test_lora_trains_only_the_adapter_and_lowers_the_loss(make, targets):
    backend = MLXBackend.from_model(MLXLMModel(make()))
    frozen = {k: np.array(v) for k, v in tree_flatten(backend.model.parameters())}
    lora = LoRA(r=4, alpha=8, target_modules=targets)
    backend.apply_method(lora.plan(BaseModel(backend.spec, backend.base_weights()), seed=0))
    backend.set_optimizer(AdamW())
    batch = _batch()
    losses = []
    for _ in range(20):
        losses.append(backend.forward_backward(batch, 1.0 / batch.n_targets))
        backend.optimizer_step(3e-2, 1.0)
    assert losses[-1] < 0.6 * losses[0]
    trainable = backend.trainable_state()
    assert trainable and all(".lora_" in k for k in trainable)
    after = {k.replace(".base_layer", ""): np.array(v) for k, v in tree_flatten(backend.model.parameters())
             if ".lora_" not in k}
    assert after.keys() == frozen.keys()
    assert all(np.array_equal(after[k], frozen[k]) for k in frozen)


def test_load_an_mlx_lm_model_directory(tmp_path):
    inner = _llama()
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(inner.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    model = load_mlx_lm_model(tmp_path)
    ids = _batch().input_ids
    np.testing.assert_allclose(np.array(model.logits(model(mx.array(ids)))), np.array(inner(mx.array(ids))),
                               rtol=1e-5, atol=1e-5)


def test_loading_refuses_what_mlx_lm_cannot_read(tmp_path):
    with pytest.raises(TwintuneError, match="no config.json"):
        load_mlx_lm_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(TwintuneError, match="no safetensors"):
        load_mlx_lm_model(tmp_path)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(_llama().parameters())))
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, model_type="no_such_family")))
    with pytest.raises(TwintuneError, match="mlx-lm cannot load"):
        load_mlx_lm_model(tmp_path)


def test_exported_adapter_loads_in_mlx_lm_with_the_same_logits(tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    from twintune.formats.mlx_lm_adapter import write_mlx_lm_adapter

    backend = MLXBackend.from_model(MLXLMModel(_llama()))
    lora = LoRA(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    backend.apply_method(lora.plan(BaseModel(backend.spec, backend.base_weights()), seed=0))
    backend.set_optimizer(AdamW())
    batch = _batch()
    for _ in range(3):  # B is no longer zero: the adapter changes the logits
        backend.forward_backward(batch, 1.0 / batch.n_targets)
        backend.optimizer_step(1e-2, 1.0)
    out = write_mlx_lm_adapter(tmp_path / "adapter", backend.trainable_state(), lora, num_layers=LLAMA["num_hidden_layers"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]

    theirs = _llama()  # the same seed: the same base weights
    base_logits = np.array(theirs(mx.array(batch.input_ids)))
    load_adapters(theirs, str(out))
    expected = np.array(theirs(mx.array(batch.input_ids)))
    ours = backend.logits(batch.input_ids)
    assert np.abs(ours - base_logits).max() > 1e-3
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_adapters_mlx_lm_cannot_take(tmp_path):
    from twintune.formats.mlx_lm_adapter import write_mlx_lm_adapter

    lora = LoRA(r=2, alpha=4)
    neo = {"transformer.h.0.attn.attention.q_proj.lora_A.weight": np.zeros((2, 8), np.float32),
           "transformer.h.0.attn.attention.q_proj.lora_B.weight": np.zeros((8, 2), np.float32)}
    with pytest.raises(TwintuneError, match="GPT-Neo is not one of them"):
        write_mlx_lm_adapter(tmp_path, neo, lora, num_layers=1)
    gap = {f"model.layers.0.self_attn.q_proj.lora_{x}.weight": np.zeros((2, 2), np.float32) for x in "AB"}
    with pytest.raises(TwintuneError, match="last blocks"):
        write_mlx_lm_adapter(tmp_path, gap, lora, num_layers=2)  # block 0 adapted, block 1 not


def test_a_recipe_trains_an_mlx_lm_model_evaluates_and_exports_it(tmp_path, capsys):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    from twintune.cli import main
    from twintune.train.runs import open_run

    model_dir = write_tiny_llama(tmp_path / "tiny-llama")
    settings = ["--set", f"model={model_dir}", "--set", "train.max_steps=6", "--set", "data.synthetic_size=120",
                "--set", "method.target_modules=[q_proj,v_proj]", "--set", "train.lr=1e-2"]
    run_dir = tmp_path / "run"
    assert main(["train", "recipes/demo-financial-sentiment.yaml", "--backend", "mlx", "--out", str(run_dir),
                 "--no-progress", *settings]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    assert main(["eval", str(run_dir), "--backend", "mlx", "--json"]) == 0
    assert main(["export", str(run_dir), "--format", "mlx-lm", "--out", str(tmp_path / "mlx")]) == 0

    ids = _batch(vocab=1024).input_ids
    ours = open_run(run_dir, "mlx", with_data=False).backend.logits(ids)
    theirs, _ = load_model(model_dir)
    base = np.array(theirs(mx.array(ids)))
    load_adapters(theirs, str(tmp_path / "mlx"))
    assert np.abs(ours - base).max() > 1e-4  # the adapter trained
    np.testing.assert_allclose(ours, np.array(theirs(mx.array(ids))), rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    assert main(["train", "recipes/demo-financial-sentiment.yaml", "--backend", "torch", "--no-progress", *settings]) == 2
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "runs on the mlx backend only" in err and "merge writes GPT-Neo checkpoints" in err


def test_an_mlx_lm_llama_adapter_on_some_blocks_goes_both_ways_with_peft(tmp_path):
    """layers_pattern names the model's own block list: a llama's `layers` (GPT-Neo's is `h`), so PEFT
    takes twintune's adapter of some blocks, and twintune takes PEFT's (issue 28)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    from model_helpers import torch_logits
    from twintune.api import load
    from twintune.cli import main
    from twintune.train.runs import open_run

    model_dir = write_tiny_llama(tmp_path / "tiny-llama")
    run_dir = tmp_path / "run"
    assert main(["train", "recipes/demo-financial-sentiment.yaml", "--backend", "mlx", "--out", str(run_dir),
                 "--no-progress", "--set", f"model={model_dir}", "--set", "train.max_steps=4", "--set",
                 "data.synthetic_size=120", "--set", "method.target_modules=[q_proj,v_proj]", "--set",
                 "method.layers_to_transform=[1]", "--set", "train.lr=1e-2"]) == 0
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["layers_pattern"] == "layers" and config["layers_to_transform"] == [1]
    ids = _batch(vocab=1024).input_ids
    ours = open_run(run_dir, "mlx", with_data=False).backend.logits(ids)
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    base = torch_logits(hf, ids)
    theirs = torch_logits(PeftModel.from_pretrained(hf, str(run_dir / "adapter")), ids)
    assert np.abs(ours - base).max() > 1e-4  # the adapter trained
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()

    torch.manual_seed(0)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                                     layers_pattern="layers", init_lora_weights=False)).eval()
    peft.save_pretrained(str(tmp_path / "peft"))
    loaded = load(str(model_dir), adapter=tmp_path / "peft", backend="mlx").logits(ids)
    theirs = torch_logits(peft, ids)
    assert np.abs(loaded - theirs).max() < 1e-4 * np.abs(theirs).max()


def length_reward(prompts, completions, **columns):
    """A reward that differs between a random model's completions (GRPO learns nothing from equal ones)."""
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("task,head", [
    ("{name: classification, head: linear}", "score.weight"), ("{name: reward}", "score.weight"), ("preference", None),
    ("kto", None), ("{name: grpo, reward: 'python:test_mlx_lm_models.length_reward', max_new_tokens: 3}", None),
    ("{name: ppo, reward: 'python:twintune.rewards.upbeat', max_new_tokens: 3}", "v_head.weight")])
def test_every_head_and_preference_task_trains_an_mlx_lm_model_and_reopens(tmp_path, task, head):
    """A head (a classifier's, a reward model's, PPO's value head) reads the model's width from the
    wrapped mlx-lm model's spec; each run is saved and opens again with the values it trained."""
    from twintune.cli import main
    from twintune.formats.adapter import load_adapter
    from twintune.train.runs import open_run

    model_dir = write_tiny_llama(tmp_path / "tiny-llama")
    run_dir = tmp_path / "run"
    assert main(["train", "recipes/demo-financial-sentiment.yaml", "--backend", "mlx", "--out", str(run_dir),
                 "--no-progress", "--set", f"model={model_dir}", "--set", f"task={task}", "--set", "train.max_steps=2",
                 "--set", "data.synthetic_size=60", "--set", "train.batch_size=4",
                 "--set", "method.target_modules=[q_proj,v_proj]"]) == 0
    run = open_run(run_dir, "mlx", with_data=False)  # its plan (heads included) takes the saved values
    _, saved = load_adapter(run_dir / "adapter", run.spec)
    assert head is None or head in saved
    start = run.plan.initial_values()
    assert saved.keys() == start.keys() and any(not np.array_equal(saved[k], start[k]) for k in saved)  # it trained
