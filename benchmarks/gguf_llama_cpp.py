"""`twintune export --format gguf` read by llama.cpp itself: the logits llama-cpp-python computes from
our GGUF files (f32, f16, q8_0; and the base with our GGUF LoRA file) against ours on the same tokens.

    python -m benchmarks.gguf_llama_cpp [--hidden 256] [--layers 4] [--no-save]

A random llama of the given shape (mlx-lm's llama, GPT-Neo's BPE tokenizer), a LoRA run of 20 steps
on it (MLX, task causal_lm, synthetic text), exported; each file evaluated by llama.cpp on 3 rows
of 48 token ids. Reported: the largest logit difference over the rows as a share of the largest
logit, and how often the two agree on the top token. Needs llama-cpp-python (`pip install
llama-cpp-python`, which compiles llama.cpp); without it the benchmark says so and stops.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import announce_machine, write_result


def _tiny_llama(path: Path, hidden: int, layers: int) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from twintune.formats.tiny_model import builtin_model_dir

    config = dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                  num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, rms_norm_eps=1e-5,
                  vocab_size=1024, tie_word_embeddings=False, max_position_embeddings=512)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**config))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((builtin_model_dir("tiny-gpt-neo") / name).read_bytes())
    return path


def _llama_cpp_logits(path: Path, rows: np.ndarray, lora: Path | None = None) -> np.ndarray:
    from llama_cpp import Llama

    # float32 keys and values in its cache (its default is float16, which alone puts 3e-4 between us)
    model = Llama(model_path=str(path), lora_path=str(lora) if lora else None, logits_all=True,
                  n_ctx=rows.shape[1] + 8, n_threads=2, verbose=False, seed=0, type_k=0, type_v=0)
    out = []
    for row in rows:
        model.reset()
        model.eval(row.tolist())
        out.append(np.array(model.scores[: len(row)], np.float32))
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    announce_machine()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp): nothing measured",
              file=sys.stderr)
        sys.exit(1)
    from twintune.formats.gguf_export import write_gguf
    from twintune.formats.safetensors_io import read_safetensors
    from twintune.recipe import load_recipe
    from twintune.train.loop import train
    from twintune.train.runs import export_run_adapter, open_run

    root = Path(tempfile.mkdtemp(prefix="twintune-gguf-"))
    model_dir = _tiny_llama(root / "llama", args.hidden, args.layers)
    recipe = load_recipe("recipes/demo-financial-sentiment.yaml", [
        f"model={model_dir}", "task=causal_lm", "data.source=synthetic", "data.max_length=64", "train.max_steps=20",
        "train.lr=1e-3", "method={name: lora, r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}"])
    train(recipe, "mlx", root / "run", progress=False)
    rows = np.random.default_rng(0).integers(0, 1024, (3, 48)).astype(np.int32)
    ours = open_run(root / "run", "mlx", with_data=False).backend.logits(rows)
    results = {"llama_cpp_python": llama_cpp.__version__, "shape": f"{args.hidden}x{args.layers}"}
    files = {quantize: export_run_adapter(root / "run", "gguf", root / f"model-{quantize}.gguf", quantize)
             for quantize in ("f32", "f16", "q8_0")}
    lora = export_run_adapter(root / "run", "gguf-lora", root / "adapter.gguf")
    config = json.loads((model_dir / "config.json").read_text())
    untrained = write_gguf(root / "base.gguf", read_safetensors(model_dir / "model.safetensors"), config, model_dir,
                           "base", "f32")
    cases = {**{f"merged {q}": (path, None) for q, path in files.items()}, "base f32 + LoRA file": (untrained, lora)}
    scale = float(np.abs(ours).max())
    for label, (path, adapter) in cases.items():
        theirs = _llama_cpp_logits(path, rows, adapter)
        difference = float(np.abs(theirs - ours).max()) / scale
        top = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        results[label] = {"max_difference_over_max_logit": difference, "top_token_agreement": top}
        print(f"{label:24s} max |llama.cpp - ours| / max |ours| = {difference:.2e}, top-1 agreement {top:.3f}",
              flush=True)
    if not args.no_save:
        print(f"wrote {write_result('gguf_llama_cpp', results)}")


if __name__ == "__main__":
    main()
