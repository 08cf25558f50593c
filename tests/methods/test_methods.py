"""Every method of the method zoo, on both backends, held to one standard.

For each method: the trainable parameter count equals a formula written here; MLX and torch give
the same logits for the same (non-trivial) trainable values; 20 training steps give the same
losses (1e-3 relative in float32, 1e-9 in float64, dropout included where the method has it);
a saved adapter loads back, in either backend, to the same logits; a run killed with SIGKILL and
resumed ends exactly as one never stopped; eval and predict work on its run directory; and a
merge gives transformers the adapted model's logits.

Costs are shared: one module fixture trains each (method, backend, dtype) once.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from twintune.errors import TwintuneError
from twintune.formats.adapter import load_adapter, save_adapter
from twintune.formats.safetensors_io import read_safetensors
from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.loop import train
from twintune.train.runs import evaluate_target, merge_run, open_run, predict_texts

D, F, BLOCKS, VOCAB, POSITIONS = 64, 256, 4, 1024, 512  # the built-in tiny GPT-Neo


def block_parameters() -> int:
    layer_norms = 2 * 2 * D
    attention = 3 * D * D + D * D + D  # q, k, v without bias; out_proj with
    mlp = D * F + F + F * D + D
    return layer_norms + attention + mlp


# method -> (its recipe section, trainable parameters by formula)
METHODS = {
    # LoRA's options at once: per-layer rank and alpha, some blocks only, LoRA+ and dropout
    "lora": ("{name: lora, r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj, c_fc], "
             "rank_pattern: {c_fc: 2}, alpha_pattern: {v_proj: 16}, layers_to_transform: [1, 2, 3], lr_ratio_b: 4}",
             3 * (4 * (D + D) * 2 + 2 * (D + F))),
    "dora": ("{name: dora, r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj, c_fc]}",
             BLOCKS * (4 * (D + D) * 2 + 4 * (D + F) + D + D + F)),
    "ia3": ("{name: ia3}", BLOCKS * (D + D + F)),  # q, v outputs; c_proj's input (feed-forward)
    "bitfit": ("{name: bitfit}", BLOCKS * (D + F + D + 2 * D) + D),  # out_proj, c_fc, c_proj, ln_1, ln_2; ln_f
    "last_blocks": ("{name: last_blocks, n: 1}", block_parameters() + 2 * D),
    "full": ("{name: full}", VOCAB * D + POSITIONS * D + BLOCKS * block_parameters() + 2 * D),
    # Houlsby: two bottlenecks of D // 8 per block (down weight and bias, up weight and bias), with dropout;
    # Pfeiffer: one of D // 16 after the MLP of blocks 1 and 3, another non-linearity than its relu
    "adapter_houlsby": ("{name: adapter, style: houlsby, reduction_factor: 8, dropout: 0.1}",
                        BLOCKS * 2 * (2 * D * (D // 8) + D // 8 + D)),
    "adapter_pfeiffer": ("{name: adapter, style: pfeiffer, non_linearity: gelu_new, layers: [1, 3]}",
                         2 * (2 * D * (D // 16) + D // 16 + D)),
    # prompt tuning: n virtual tokens of width D; P-tuning: the input embedding and its encoder (H = encoder_hidden_size)
    "prompt": ("{name: prompt, n: 8, init: sample_vocab}", 8 * D),
    "ptuning_mlp": ("{name: ptuning, n: 6, encoder: mlp, encoder_hidden_size: 32}",
                    6 * D + (D * 32 + 32) + (32 * 32 + 32) + (32 * D + D)),
    "ptuning_lstm": ("{name: ptuning, n: 6, encoder: lstm, encoder_hidden_size: 16, encoder_num_layers: 2, "
                     "encoder_dropout: 0.1}",
                     6 * D + 2 * (4 * 16 * (D + 16) + 2 * 4 * 16) + 2 * (4 * 16 * (2 * 16 + 16) + 2 * 4 * 16)
                     + (2 * 16 * 2 * 16 + 2 * 16) + (2 * 16 * D + D)),
    # prefix tuning: n virtual tokens' keys and values for every block (BLOCKS * 2 * D each); with projection
    # (H = encoder_hidden_size) an (n, D) embedding, Linear(D, H), tanh, Linear(H, BLOCKS * 2 * D) while training
    "prefix": ("{name: prefix, n: 4, projection: true, encoder_hidden_size: 16}",
               4 * D + (D * 16 + 16) + (16 * BLOCKS * 2 * D + BLOCKS * 2 * D)),
    "prefix_plain": ("{name: prefix, n: 6}", 6 * BLOCKS * 2 * D),
    # blocks 0 and 2 (block 3's first positions would reach no prediction); separate first/last R, W, b
    "loreft": ("{name: loreft, r: 2, layers: [0, 2], positions: f1+l2, share_weights: false, dropout: 0.1}",
               2 * 2 * (2 * D + 2 * D + 2)),
}
BACKENDS = ["mlx", "torch"]
STEPS = 20


def recipe(method: str, *extra: str):
    return load_recipe("recipes/demo-financial-sentiment.yaml",
                       [f"method={METHODS[method][0]}", "data.synthetic_size=120", "train.batch_size=4",
                        "train.lr=3e-3", f"train.max_steps={STEPS}", *extra])


def ids(length: int = 20) -> np.ndarray:
    return np.random.default_rng(7).integers(0, VOCAB, (2, length)).astype(np.int32)


@pytest.fixture(scope="module")
def trained():
    """(method, backend, dtype) -> (run, the 20 steps' losses); trained once for the module."""
    cache = {}

    def get(method, backend, dtype="float32"):
        key = (method, backend, dtype)
        if key not in cache:
            run = prepare(recipe(method, f"dtype={dtype}"), backend)
            cache[key] = run, [train_step(run, step)["loss"] for step in range(STEPS)]
        return cache[key]

    return get


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_equal_the_formula(method):
    for backend in BACKENDS:
        run = prepare(recipe(method), backend, with_data=False)
        state = run.backend.trainable_state()
        assert run.plan.trainable_parameters() == METHODS[method][1]
        assert sum(v.size for v in state.values()) == METHODS[method][1]
        assert state.keys() == run.plan.initial_values().keys()


@pytest.mark.parametrize("method", METHODS)
def test_the_same_trained_values_give_the_same_logits_on_both_backends(method, trained):
    run, _ = trained(method, "mlx")
    state = run.backend.trainable_state()
    start = prepare(recipe(method), "mlx", with_data=False).backend.trainable_state()
    changed = [k for k, v in state.items() if not np.array_equal(v, start[k])]
    assert len(changed) >= len(state) // 2  # 20 steps moved the values: the comparison is not of a no-op
    other = prepare(recipe(method), "torch", with_data=False)
    other.backend.set_trainable_state(state)
    assert relative(other.backend.logits(ids()), run.backend.logits(ids())) < 1e-4


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-3), ("float64", 1e-9)])
@pytest.mark.parametrize("method", METHODS)
def test_twenty_steps_give_the_same_losses_on_both_backends(method, dtype, tolerance, trained):
    _, mlx_losses = trained(method, "mlx", dtype)
    _, torch_losses = trained(method, "torch", dtype)
    mlx_losses, torch_losses = np.array(mlx_losses), np.array(torch_losses)
    assert np.abs(mlx_losses - torch_losses).max() / np.abs(torch_losses).max() < tolerance


@pytest.mark.parametrize("method", METHODS)
def test_saved_values_load_back_to_the_same_logits_in_either_backend(method, trained, tmp_path):
    run, _ = trained(method, "torch")
    state = run.backend.trainable_state()
    save_adapter(tmp_path / "adapter", run.method, state, run.recipe.model, run.model_dir)
    loaded_method, loaded = load_adapter(tmp_path / "adapter", run.spec)
    saved = run.method.saved_values(state)  # the values themselves, or (P-tuning) what they compute
    assert loaded_method == run.method.saved_method() or loaded_method.name == run.method.name
    assert loaded.keys() == saved.keys() and all(np.array_equal(loaded[k], saved[k]) for k in saved)
    expected = run.backend.logits(ids())
    for backend in BACKENDS:
        fresh = prepare(dataclasses.replace(recipe(method), method=loaded_method), backend, with_data=False)
        fresh.backend.set_trainable_state(loaded)
        assert relative(fresh.backend.logits(ids()), expected) < (1e-6 if backend == "torch" else 1e-4)


# ---- whole runs: SIGKILL and resume, eval and predict, merge --------------------------------------

RUN_SETTINGS = ["train.save_every=5", "train.max_steps=15"]
# Each method resumes on one backend (alternating); resuming across backends is tested in
# tests/test_resume_across_backends.py, and the two backends' steps agree (above).
RESUME_BACKEND = {"lora": "mlx", "dora": "torch", "ia3": "torch", "bitfit": "mlx", "last_blocks": "mlx",
                  "full": "torch",
                  "adapter_houlsby": "mlx", "adapter_pfeiffer": "torch",
                  "prompt": "torch", "ptuning_mlp": "mlx", "ptuning_lstm": "torch",
                  "prefix": "mlx", "prefix_plain": "torch",
                  "loreft": "mlx",
}
# Methods whose trained values fold into the base weights; the others add positions, modules or
# interventions that no weight can hold, and say so.
MERGEABLE = ["lora", "dora", "ia3", "bitfit", "last_blocks", "full"]


def _cli(method, backend, out, *extra):
    args = [sys.executable, "-m", "twintune", "train", "recipes/demo-financial-sentiment.yaml", "--backend", backend,
            "--out", str(out), "--no-progress", "--set", f"method={METHODS[method][0]}", *extra]
    for item in ["data.synthetic_size=120", "train.batch_size=4", "train.lr=3e-3", *RUN_SETTINGS]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """method -> (a run killed at a checkpoint and resumed, the same run uninterrupted)."""
    runs = {}

    def get(method):
        if method in runs:
            return runs[method]
        backend, root = RESUME_BACKEND[method], tmp_path_factory.mktemp(method)
        whole = train(load_recipe("recipes/demo-financial-sentiment.yaml",
                                  [f"method={METHODS[method][0]}", "data.synthetic_size=120", "train.batch_size=4",
                                   "train.lr=3e-3", *RUN_SETTINGS]), backend, root / "whole", progress=False)
        killed = root / "killed"
        process = subprocess.Popen(_cli(method, backend, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "step-00000005").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        resumed = subprocess.run(_cli(method, backend, killed, "--resume", str(killed)), capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        runs[method] = killed, root / "whole", whole
        return runs[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(method, resumed_runs):
    killed, whole_dir, whole = resumed_runs(method)
    summary = json.loads((killed / "summary.json").read_text())
    if summary["resumed_from_step"] is None:  # the run finished before the kill landed: nothing to compare
        pytest.fail("the run was not interrupted; the checkpoint interval is too short for this machine")
    assert summary["train_losses"] == whole["train_losses"]
    assert summary["trainable_params"] == METHODS[method][1]
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"  # full: a whole checkpoint
    expected, got = read_safetensors(whole_dir / "adapter" / name), read_safetensors(killed / "adapter" / name)
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("method", METHODS)
def test_eval_and_predict_work_on_the_run_directory_on_both_backends(method, resumed_runs):
    run_dir, _, whole = resumed_runs(method)
    for backend in BACKENDS:
        report = evaluate_target(run_dir, "validation", backend)
        assert report["accuracy"] == pytest.approx(whole["val_accuracy"], abs=1 / report["examples"] + 1e-9)
        rows = predict_texts(run_dir, ["Operating profit rose to EUR 13.1 mn ."], backend)
        assert rows[0]["label"] in ("negative", "neutral", "positive")


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGEABLE])
def test_merge_is_refused_with_the_reason(method, resumed_runs, tmp_path):
    run_dir, _, _ = resumed_runs(method)
    with pytest.raises(TwintuneError, match="cannot be merged") as refused:
        merge_run(run_dir, tmp_path / "merged")
    assert "\n" not in str(refused.value) and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_gives_transformers_the_adapted_models_logits(method, resumed_runs, tmp_path):
    from transformers import GPTNeoForCausalLM

    run_dir, _, _ = resumed_runs(method)
    merged = merge_run(run_dir, tmp_path / "merged")
    model = GPTNeoForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids()).long()).logits.numpy()
    ours = open_run(run_dir, "torch", with_data=False).backend.logits(ids())
    assert relative(theirs, ours) < 1e-5


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_of_a_run_on_an_nf4_base_dequantizes_it(method, tmp_path):
    out = tmp_path / "run"
    train(recipe(method, "quantize.type=nf4", "train.max_steps=3"), "torch", out, progress=False)
    merged = merge_run(out, tmp_path / "merged")
    from transformers import GPTNeoForCausalLM

    model = GPTNeoForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids()).long()).logits.numpy()
    for backend in BACKENDS:
        assert relative(theirs, open_run(out, backend, with_data=False).backend.logits(ids())) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dora", "full"])
def test_gradient_checkpointing_gives_the_same_steps(method, backend):
    losses = {}
    for checkpointing in (False, True):
        run = prepare(recipe(method, f"train.gradient_checkpointing={checkpointing}", "train.warmup_steps=0"), backend)
        losses[checkpointing] = [train_step(run, step)["loss"] for step in range(4)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
