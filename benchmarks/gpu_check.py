"""The GPU check: what only an NVIDIA GPU shows, in one table (issue 28). Under 8 minutes on one GPU.

    python -m benchmarks.gpu_check [--shape 1.3b] [--examples 128] [--repeats 3] [--cpu-rehearsal]

1. NF4 on CUDA: bitsandbytes' `quantize_4bit` (NF4, blocks of 64, double quantization) of random
   weights against twintune's numpy quantizer, byte for byte (codes, absmax codes, their scales);
   and bitsandbytes' CUDA `dequantize_4bit` of twintune's bytes against twintune's own
   dequantization, which is what both backends compute with.
2. The torch backend on CUDA (float32) against the torch backend on the CPU in float64 (which
   equals transformers in float64 to ~1e-9, tests/parity/): the logits of the built-in tiny GPT-Neo
   with a LoRA adapter of seeded random values.
3. LoRA and QLoRA at GPT-Neo's `--shape` (random weights, the built-in tokenizer) in bfloat16:
   twintune's torch backend against transformers + PEFT (QLoRA: bitsandbytes' Linear4bit through
   `BitsAndBytesConfig`, NF4 with double quantization, bf16 compute) in a plain loop with dynamic
   padding, the same batches; real tokens/s and CUDA peak memory, each contender in its own
   process, median of `--repeats` epochs after a warm-up epoch; the ratios ours / theirs.

`--cpu-rehearsal` runs the same code on the CPU with the tiny shape: it proves the script, and its
figures mean nothing (nothing is written). Results go to results/gpu_check.json; the table is
printed last. The GPU machine's image lacks bitsandbytes and MLX: carry their wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from benchmarks.common import run_child, write_result

NF4_SHAPES = ((2048, 2048), (8192, 2048))  # GPT-Neo 1.3B's attention and feed-forward weights
LOGIT_IDS = np.random.default_rng(0).integers(0, 1024, (2, 24))
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


# ---- 1. NF4 bytes ---------------------------------------------------------------------------------

def nf4_rows(device: str) -> list[dict]:
    """The standard tests/quant/test_nf4.py holds on the CPU: the same 4-bit codes; the absmax mean (double
    quantization's offset) at most one ulp from torch's reduction; given bitsandbytes' mean, the same
    nested 8-bit codes and scales; and bitsandbytes' dequantization of our bytes equal to ours."""
    import torch

    from twintune.backends.torch.nf4 import bitsandbytes_dequantize, import_bitsandbytes
    from twintune.quant.nf4 import dequantize_nf4, quantize_blockwise_8bit, quantize_nf4

    bnb_f = import_bitsandbytes().functional
    rows = []
    for shape in NF4_SHAPES:
        name = f"{shape[0]}x{shape[1]}"
        weight = (np.random.default_rng(1).standard_normal(shape) * 0.02).astype(np.float32)
        ours = quantize_nf4(weight, blocksize=64, double_quant=True)
        packed, state = bnb_f.quantize_4bit(torch.from_numpy(weight).to(device), blocksize=64,
                                            compress_statistics=True, quant_type="nf4")
        codes = packed.cpu().numpy().reshape(-1)
        offset = np.float32(state.offset.item())
        ulps = abs(int(ours.absmax_offset.view(np.int32)) - int(offset.view(np.int32)))
        nested_codes, nested_scales = quantize_blockwise_8bit(quantize_nf4(weight, 64, double_quant=False).absmax
                                                              - offset, 256)
        nested = (np.array_equal(nested_codes, state.absmax.cpu().numpy().reshape(-1))
                  and np.array_equal(nested_scales, state.state2.absmax.cpu().numpy().reshape(-1)))
        difference = float(np.abs(bitsandbytes_dequantize(ours, torch.float32, device).cpu().numpy()
                                  - dequantize_nf4(ours)).max())
        rows += [
            {"check": f"NF4 codes {name}", "value": float(np.mean(codes == ours.packed.reshape(-1))),
             "unit": "share equal", "passes": bool(np.array_equal(codes, ours.packed.reshape(-1)))},
            {"check": f"absmax mean (double quant offset) {name}", "value": ulps, "unit": "ulps apart",
             "passes": ulps <= 1},
            {"check": f"nested absmax codes + scales, given bnb's mean {name}", "value": float(nested),
             "unit": "identical", "passes": nested},
            {"check": f"bnb dequantize of our bytes {name}", "value": difference, "unit": "max |diff|",
             "passes": difference == 0.0},
        ]
    return rows


# ---- 2. CUDA against CPU float64 ------------------------------------------------------------------

def logits_child(dtype: str) -> dict:
    """The tiny model's logits with a seeded random LoRA adapter, on whatever device torch sees."""
    import torch

    from twintune.recipe import load_recipe
    from twintune.train.build import prepare

    run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml", [f"dtype={dtype}", "data.synthetic_size=60"]),
                  "torch", with_data=False)
    rng = np.random.default_rng(2)
    state = {name: (rng.standard_normal(value.shape) * 0.05).astype(value.dtype)
             for name, value in run.backend.trainable_state().items()}
    run.backend.set_trainable_state(state)
    return {"device": str(run.backend.device), "cuda": torch.cuda.is_available(),
            "logits": run.backend.logits(LOGIT_IDS.astype(np.int32)).astype(np.float64).tolist()}


def logit_rows() -> list[dict]:
    device = run_child("benchmarks.gpu_check", ["--child", "logits", "--dtype", "float32"], mlx=False)
    reference = run_child("benchmarks.gpu_check", ["--child", "logits", "--dtype", "float64"], mlx=False,
                          env=CPU_ONLY)
    ours, exact = np.array(device["logits"]), np.array(reference["logits"])
    error = float(np.abs(ours - exact).max() / np.abs(exact).max())
    return [{"check": f"torch backend on {device['device']} (float32) vs CPU float64 logits", "value": error,
             "unit": "max rel error", "passes": error < 1e-5}]


# ---- 3. LoRA and QLoRA at a real shape ------------------------------------------------------------

def _recipe(shape: str, examples: int, quantized: bool):
    from benchmarks.compare_torch import LORA, method_override, model_dir
    from twintune.recipe import load_recipe

    total = int(examples / 0.8) + 3
    return load_recipe("recipes/demo-financial-sentiment.yaml", [
        f"model={model_dir(shape)}", f"data.synthetic_size={max(30, total)}", "train.epochs=1",
        f"train.batch_size={LORA['batch']}", f"train.lr={LORA['lr']}", "train.warmup_steps=0",
        method_override("lora"), "train.schedule=constant", "train.max_grad_norm=0", "train.group_by_length=true",
        "dtype=bfloat16", f"quantize.type={'nf4' if quantized else 'none'}"])


def speed_child(kind: str, shape: str, examples: int, repeats: int, quantized: bool) -> dict:
    import torch

    from twintune.data.batching import TrainOrder
    from twintune.train.build import prepare
    from twintune.train.step import train_step

    torch.manual_seed(0)
    # the reference needs only the batches: its prepare skips quantizing (the data are the same)
    run = prepare(_recipe(shape, examples, quantized and kind == "twintune"), "torch")
    encoded = run.splits["train"][:examples]
    if kind == "twintune":
        def epoch():
            for step in range(run.order.steps_per_epoch):
                train_step(run, step)
    else:
        run.backend = None  # the reference's model alone holds the GPU's memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        order = TrainOrder(encoded, 8, 1, run.recipe.seed)
        epoch = _peft_epoch(shape, [b for s in range(order.steps_per_epoch) for b in order.step_batches(s)], quantized)
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    epoch()
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        epoch()
        synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"kind": kind, "quantized": quantized, "real_tokens_per_s": sum(len(e.ids) for e in encoded) / seconds,
            "epoch_seconds": seconds, "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available() else None}


def _peft_epoch(shape: str, batches, quantized: bool):
    """transformers + PEFT as a careful user writes QLoRA/LoRA: bf16, the same LoRA, a plain loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, GPTNeoForCausalLM

    from benchmarks.compare_torch import LORA, model_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {"dtype": torch.bfloat16}
    if quantized:
        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True,
                                                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = GPTNeoForCausalLM.from_pretrained(str(model_dir(shape)), **options).to(device)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA["lr"], weight_decay=0.0)
    model.train()

    def inputs(batch):
        ids = torch.from_numpy(batch.input_ids.astype(np.int64))
        mask = (torch.arange(ids.shape[1])[None, :] < torch.from_numpy(batch.lengths)[:, None]).long()
        labels = torch.full_like(ids, -100)
        labels.view(-1)[torch.from_numpy(batch.target_positions.astype(np.int64)) + 1] = torch.from_numpy(
            batch.targets.astype(np.int64))
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def epoch():
        for batch in batches:
            model(**inputs(batch)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return epoch


def speed_rows(shape: str, examples: int, repeats: int) -> tuple[list[dict], dict]:
    rows, raw = [], {}
    for quantized, name in ((False, "LoRA"), (True, "QLoRA")):
        for kind in ("twintune", "peft"):
            raw[name, kind] = run_child("benchmarks.gpu_check", ["--child", "speed", "--kind", kind, "--shape", shape,
                                                                 "--examples", str(examples), "--repeats", str(repeats),
                                                                 *(["--quantized"] if quantized else [])], mlx=False)
        ours, theirs = raw[name, "twintune"], raw[name, "peft"]
        rows.append({"check": f"{name} {shape} bf16 tokens/s, ours / transformers+PEFT",
                     "value": ours["real_tokens_per_s"] / theirs["real_tokens_per_s"], "unit": "ratio",
                     "detail": f"{ours['real_tokens_per_s']:.0f} vs {theirs['real_tokens_per_s']:.0f}", "passes": None})
        if ours["cuda_peak_mb"] is not None:
            rows.append({"check": f"{name} {shape} bf16 CUDA peak memory, ours / transformers+PEFT",
                         "value": ours["cuda_peak_mb"] / theirs["cuda_peak_mb"], "unit": "ratio",
                         "detail": f"{ours['cuda_peak_mb']:.0f} MB vs {theirs['cuda_peak_mb']:.0f} MB", "passes": None})
    return rows, {f"{name} {kind}": row for (name, kind), row in raw.items()}


def print_table(rows: list[dict]) -> None:
    width = max(len(row["check"]) for row in rows) + 2
    print(f"{'check':{width}}{'value':>12}  {'unit':14}{'verdict':9}detail")
    for row in rows:
        verdict = {True: "PASS", False: "FAIL", None: ""}[row["passes"]]
        print(f"{row['check']:{width}}{row['value']:12.4g}  {row['unit']:14}{verdict:9}{row.get('detail', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.3b")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-rehearsal", action="store_true", help="the same code on the CPU, tiny shape")
    parser.add_argument("--child", choices=("logits", "speed"))
    parser.add_argument("--kind", default="twintune")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantized", action="store_true")
    args = parser.parse_args()
    if args.child == "logits":
        print(json.dumps(logits_child(args.dtype)))
        return
    if args.child == "speed":
        print(json.dumps(speed_child(args.kind, args.shape, args.examples, args.repeats, args.quantized)))
        return
    import torch

    if not torch.cuda.is_available() and not args.cpu_rehearsal:
        raise SystemExit("gpu_check: torch sees no CUDA device here; run it on a machine with an NVIDIA GPU "
                         "(or --cpu-rehearsal to try the script on the CPU).")
    if args.cpu_rehearsal:
        os.environ.update(CPU_ONLY)
        args.shape, args.examples, args.repeats = "tiny", 16, 1
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = nf4_rows(device) + logit_rows()
    speed, raw = speed_rows(args.shape, args.examples, args.repeats)
    rows += speed
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (rehearsal: no figure means anything)"
    print(f"\ngpu_check on {name}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s")
    print_table(rows)
    if not args.cpu_rehearsal:  # a rehearsal's figures mean nothing: nothing is kept
        print(f"wrote {write_result('gpu_check', {'device': name, 'rows': rows, 'speed': raw})}")


if __name__ == "__main__":
    main()
