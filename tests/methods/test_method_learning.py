"""Every method learns the demo task on both backends (LoRA's own test is tests/test_learning.py).

The built-in tiny GPT-Neo (4 blocks of width 64, pre-trained for 3000 next-token steps on unlabelled
synthetic sentences) scores the label words at chance (1/3) before fine-tuning. Each method
trains the demo recipe with its own learning rate; the bar is 0.9 validation accuracy where the
method reaches it in the test's budget, and otherwise the measured figure less a margin, still
well above chance, with the reason beside it. Measured on torch (CPU, this recipe; MLX gives the
same figures), the last figure is what the bar stands on:

    lora         the demo recipe: lr 4e-3, 300 steps           0.93 (MLX 0.93; lr 5e-3: 0.93, MLX 0.87)
    dora         all six layer types, lr 4e-3, 300 steps      0.92 (MLX 0.93)
    ia3          all six (c_proj's input), lr 0.05, 450 steps of 8   0.71 (lr 0.02: 0.69; 900 steps: 0.75)
    bitfit       lr 1e-2, 450 steps                           0.59
    vera         r=64 on all six layer types, lr 5e-2, 300 steps    0.89 (MLX 0.89; r=256: 0.91; lr 2e-2: 0.65)
    last_blocks  n=2 with the embeddings, lr 3e-3, 225 steps  0.95
    full         lr 1e-3, 225 steps                           0.97
    loreft       r=8, f4+l8, lr 3e-2, 150 steps               0.63
    adapter      houlsby, reduction_factor 4, lr 1e-2, 100 steps   0.59
    adapter      pfeiffer, reduction_factor 2, lr 3e-3, 300 steps  0.63 (0.53 at 150; lr 1e-2: 0.55 at 300)
    prefix       n=10 with projection, lr 3e-3, 300 steps      0.69
    prompt       n=20 sample_vocab, lr 0.3, 450 steps          0.56 (lr 0.03: 0.60 after 750)
    ptuning      n=20 MLP encoder, lr 3e-3, 750 steps          0.51 (lr 1e-2: 0.49)

Why 3000 pre-training steps: prompt tuning and P-tuning cannot change the model, only what it reads
before the text, so they need a model whose attention already reads its input. On the first
built-in model (300 steps, near-uniform attention) they stayed at chance (prompt tuning at lr 0.01
to 1.0 and three inits, P-tuning at 3e-3 and 1e-2: 0.29-0.43 over 900 steps), while the label-token
loss fell; after 1000 steps still 0.36 after 300; after 3000, 0.56 after 450 (0.60 after 750 at lr 0.03). Methods that scale
activations (IA3) lose on the longer-trained model (0.92 -> 0.71); LoRA needs more steps (3e-3 ->
4e-3, 3 -> 4 epochs) for 0.93.
"""

import pytest

from twintune.recipe import load_recipe
from twintune.train.build import prepare
from twintune.train.step import train_step
from twintune.train.evaluate import evaluate

ALL_LINEAR = "[q_proj, k_proj, v_proj, out_proj, c_fc, c_proj]"
# The figures above were measured on the demo as it was then (1500 sentences, 4 epochs, lr 4e-3); the
# cases keep those settings under their own, so that each bar stands on what was measured. (The
# demo itself now trains on 3000 sentences for 2 epochs at lr 1.75e-3: tests/test_learning.py.)
MEASURED_ON = ["data.synthetic_size=1500", "train.epochs=4", "train.lr=4e-3"]
# method -> (recipe overrides, the bar, why that bar)
CASES = {
    "dora": ([f"method={{name: dora, r: 8, alpha: 16, target_modules: {ALL_LINEAR}}}"], 0.9,
             "the demo's LoRA settings with DoRA's magnitudes: as good as LoRA (0.92)"),
    "ia3": ([f"method={{name: ia3, target_modules: {ALL_LINEAR}, feedforward_modules: [c_proj]}}", "train.lr=0.05",
             "train.batch_size=8", "train.epochs=3"], 0.65, "3,072 scaling values, in 450 steps of 8 sentences: 0.71; scaling what "
            "the pre-trained model computes moves it less than LoRA's added directions"),
    "vera": ([f"method={{name: vera, r: 64, target_modules: {ALL_LINEAR}}}", "train.lr=5e-2"], 0.85,
             "3,840 scaling values on projections shared by every layer: 0.89 after 300 steps"),
    "bitfit": (["method={name: bitfit}", "train.lr=1e-2", "train.epochs=6"], 0.5,
               "2,112 biases cannot turn a model that scores the labels at chance into a classifier quickly: "
               "0.59 after 450 steps; 0.5 is well above chance (0.33)"),
    "last_blocks": (["method={name: last_blocks, n: 2, include_embeddings: true}", "train.lr=3e-3", "train.epochs=3"], 0.9,
                    "the tied embedding is GPT-Neo's output layer: with it the label words' vectors learn too"),
    "full": (["method={name: full}", "train.lr=1e-3", "train.epochs=3"], 0.9, "every parameter: the easiest case"),
    # Bottleneck adapters level off near 0.65 on this task (measured on the 300-step model: reduction factors
    # 1-16, lr 3e-3 to 1e-2, up to 450 steps), so the bar is a short run's figure less a margin, well above chance
    "adapter_houlsby": (["method={name: adapter, style: houlsby, reduction_factor: 4}", "train.lr=1e-2",
                         "train.max_steps=100"], 0.55, "two bottlenecks of 16 per block: 0.59 after 100 steps"),
    "adapter_pfeiffer": (["method={name: adapter, style: pfeiffer, reduction_factor: 2}", "train.lr=3e-3",
                          "train.max_steps=300"], 0.55, "one bottleneck of 32 per block: 0.63 after 300 steps"),
    "prefix": (["method={name: prefix, n: 10, projection: true}", "train.lr=3e-3", "train.epochs=4"], 0.5,
               "prefixes only add keys and values beside the text's, which the 4 small blocks must learn to read: "
               "0.69 after 300 steps with PEFT's projection MLP; 0.5 is well above chance (0.33)"),
    "prompt": (["method={name: prompt, n: 20, init: sample_vocab}", "train.lr=0.3", "train.epochs=6"], 0.5,
               "20 virtual tokens steer what the frozen model reads: 0.56 after 450 steps, on a model "
               "pre-trained long enough that its attention reads its input (see above); chance is 0.33"),
    "ptuning": (["method={name: ptuning, n: 20, encoder: mlp}", "train.lr=3e-3", "train.epochs=10"], 0.45,
                "20 virtual tokens from an MLP encoder: 0.51 after 750 steps; 0.45 is well above chance "
                "(0.33)"),
    "loreft": (["method={name: loreft, r: 8, positions: f4+l8}", "train.lr=3e-2", "train.epochs=2"], 0.5,
               "edits of rank 8 at a few prompt positions only, and those are template words: the sentiment must "
               "reach the last position through attention the edits steer; 0.63 after 150 steps; 0.5 is well "
               "above chance (0.33)"),
}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("method", CASES)
def test_method_learns_the_demo_task(method, backend):
    overrides, bar, reason = CASES[method]
    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", MEASURED_ON + overrides), backend)
    before = evaluate(run).accuracy
    for step in range(run.total_steps):
        train_step(run, step)
    after = evaluate(run).accuracy
    assert before < 0.45, before  # chance, before training (the same start for every method)
    assert after >= bar, f"{method} on {backend}: validation accuracy {after:.3f} < {bar} ({reason})"
