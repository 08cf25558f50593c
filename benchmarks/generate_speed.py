"""Greedy generation speed: twintune against transformers' `generate` (torch) and mlx-lm's `generate_step` (MLX).

    python -m benchmarks.generate_speed [--quick] [--prompt-tokens P] [--new-tokens N] [--repeats R] [--no-save]

Four contenders, each in its own process, each decoding N new tokens greedily after the same P-token
prompt (seeded random ids), with a key/value cache, the prompt's prefill included in the time:

  twintune_torch  twintune's torch backend (twintune.generation.generate_ids) on a random-weight
                  GPT-Neo of the 125M shape (compare_torch's model)
  transformers    transformers' GPTNeoForCausalLM on the same checkpoint: `generate(do_sample=False,
                  max_new_tokens=N, min_new_tokens=N)` (min_new_tokens: no early end-of-text)
  twintune_mlx    twintune's MLX backend wrapping mlx-lm's random-weight llama of compare_mlx's
                  `small` shape (MLXLMModel, mlx-lm's own cache)
  mlx_lm          mlx-lm's `generate_step` on the same model with an argmax sampler

twintune never stops early here (an end-of-text id no token has). Each pair must write the same
tokens (checked and printed: the same model decoded greedily by two programs). Tokens/s is N over
the median of R timed generations after one warm-up. Target: twintune's tokens/s >= 1.0x the
reference's on each framework. Results: results/generate_speed[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from benchmarks.common import check_targets, peak_rss_mb, run_child, write_result

KINDS = {"twintune_torch": "torch", "transformers": "torch", "twintune_mlx": "mlx", "mlx_lm": "mlx"}
TARGETS = {"tokens_per_s_ratio_torch": (">=", 1.0), "tokens_per_s_ratio_mlx": (">=", 1.0)}


def prompt_ids(n: int) -> list[int]:
    return np.random.default_rng(0).integers(1, 1024, n).tolist()  # ids both models' vocabularies have


def child(kind: str, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    prompt = prompt_ids(prompt_tokens)
    generate = {"twintune_torch": _twintune_torch, "transformers": _transformers, "twintune_mlx": _twintune_mlx,
                "mlx_lm": _mlx_lm}[kind](prompt, new_tokens)
    tokens = generate()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        again = generate()
        times.append(time.perf_counter() - start)
        assert again == tokens, "greedy decoding changed between repeats"
    seconds = statistics.median(times)
    return {"kind": kind, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "seconds": seconds, "times": times,
            "tokens_per_s": new_tokens / seconds, "peak_rss_mb": peak_rss_mb(), "tokens": tokens}


def _twintune_torch(prompt, new_tokens):
    from benchmarks.compare_torch import model_dir
    from twintune.api import load
    from twintune.generation import generate_ids

    model = load(str(model_dir("125m")), backend="torch")
    return lambda: generate_ids(model.backend, prompt, context=model.base.spec.max_positions, virtual_tokens=0,
                                eos_id=-1, max_tokens=new_tokens)[0]


def _transformers(prompt, new_tokens):
    import torch
    from transformers import GPTNeoForCausalLM

    from benchmarks.compare_torch import model_dir

    model = GPTNeoForCausalLM.from_pretrained(model_dir("125m")).eval()
    ids = torch.tensor([prompt])

    def generate():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, use_cache=True)
        return out[0, len(prompt):].tolist()
    return generate


def _twintune_mlx(prompt, new_tokens):
    from benchmarks.compare_mlx import mlx_lm_model
    from twintune.backends.mlx.backend import MLXBackend
    from twintune.backends.mlx.mlx_lm_model import MLXLMModel
    from twintune.generation import generate_ids

    backend = MLXBackend.from_model(MLXLMModel(mlx_lm_model("small")))
    return lambda: generate_ids(backend, prompt, context=10**9, virtual_tokens=0, eos_id=-1, max_tokens=new_tokens)[0]


def _mlx_lm(prompt, new_tokens):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from benchmarks.compare_mlx import mlx_lm_model

    model = mlx_lm_model("small")

    def generate():
        steps = generate_step(mx.array(prompt), model, max_tokens=new_tokens, sampler=lambda x: mx.argmax(x, axis=-1))
        return [int(token) for token, _ in steps]
    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32-token prompt, 32 new tokens, 3 repeats")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="print only; write no results/*.json")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 32, 32, 3
    if args.child:
        print(json.dumps(child(args.child, args.prompt_tokens, args.new_tokens, args.repeats)))
        return
    rows = {}
    for kind, framework in KINDS.items():
        rows[kind] = run_child("benchmarks.generate_speed", ["--child", kind, "--prompt-tokens", str(args.prompt_tokens),
                                                             "--new-tokens", str(args.new_tokens),
                                                             "--repeats", str(args.repeats)], mlx=framework == "mlx")
        print(json.dumps({k: v for k, v in rows[kind].items() if k != "tokens"}), flush=True)
    same = {"torch": rows["twintune_torch"]["tokens"] == rows["transformers"]["tokens"],
            "mlx": rows["twintune_mlx"]["tokens"] == rows["mlx_lm"]["tokens"]}
    ratios = {"tokens_per_s_ratio_torch": rows["twintune_torch"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"],
              "tokens_per_s_ratio_mlx": rows["twintune_mlx"]["tokens_per_s"] / rows["mlx_lm"]["tokens_per_s"]}
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    print(f"greedy decoding, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'kind':<16}{'seconds':>10}{'tokens/s':>12}{'peak RSS MB':>14}")
    for kind, row in rows.items():
        print(f"{kind:<16}{row['seconds']:>10.3f}{row['tokens_per_s']:>12.1f}{row['peak_rss_mb']:>14.1f}")
    print(f"same tokens as the reference: torch {same['torch']}, mlx {same['mlx']}")
    targets = check_targets(ratios, TARGETS)
    if not args.no_save:
        path = write_result("generate_speed" + ("_quick" if args.quick else ""),
                            {"rows": rows, "same_tokens": same, "ratios": ratios, "targets": targets})
        print(f"wrote {path}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
