"""Forward + backward of one NF4 layer in MLX against a float32 layer of the same shape, same run.

    python -m benchmarks.nf4_layer_speed [--out-features 2048] [--in-features 2048] [--tokens 512]

The QLoRA backward needs the gradient of the input only (the base is frozen), so every variant
computes y = x W^T forward and dx = dy W backward. Variants:
  fp32            a float32 weight, one GEMM each way (the reference)
  nf4_composed    our NF4 layer on this device's path: dequantize (level lookup x absmax), then GEMM
  nf4_dequantize  the dequantize alone, to show where NF4's extra time goes
  affine4         MLX's native 4-bit affine quantized_matmul (group 64), the Mac-speed option
Real tokens/s = tokens / median seconds of a forward + backward.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import median_time, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-features", type=int, default=2048)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import mlx.core as mx

    from twintune.backends.mlx.nf4 import NF4Linear
    from twintune.quant.nf4 import quantize_nf4

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.out_features, args.in_features)) * 0.02).astype(np.float32)
    x = mx.array(rng.standard_normal((args.tokens, args.in_features)).astype(np.float32))
    dy = mx.array(rng.standard_normal((args.tokens, args.out_features)).astype(np.float32))
    nf4 = NF4Linear(quantize_nf4(weight))
    w32 = mx.array(weight)
    wq, scales, biases = mx.quantize(w32, group_size=64, bits=4)
    mx.eval(x, dy, w32, wq, scales, biases, nf4.parameters())

    def forward_backward(layer):
        def run():
            y, (dx,) = mx.vjp(layer, [x], [dy])
            mx.eval(y, dx)
        return run

    variants = {
        "fp32": forward_backward(lambda inp: inp @ w32.T),
        "nf4_composed": forward_backward(nf4),
        "nf4_dequantize": lambda: mx.eval(nf4.dequantized_weight()),
        "affine4": forward_backward(lambda inp: mx.quantized_matmul(inp, wq, scales, biases, transpose=True,
                                                                   group_size=64, bits=4)),
    }
    rows = {}
    for name, fn in variants.items():
        seconds, times = median_time(fn, args.repeats, warmup=2)
        rows[name] = {"median_ms": round(seconds * 1e3, 2), "times_ms": [round(t * 1e3, 2) for t in times]}
        if name != "nf4_dequantize":
            rows[name]["tokens_per_s"] = round(args.tokens / seconds, 1)
    for name, row in rows.items():
        row["time_vs_fp32"] = round(row["median_ms"] / rows["fp32"]["median_ms"], 3)
    print(f"layer {args.out_features}x{args.in_features}, {args.tokens} tokens, forward+backward (input grad), "
          f"device {mx.default_device()}")
    for name, row in rows.items():
        print(f"{name:16s} {row['median_ms']:9.2f} ms  {row.get('tokens_per_s', '-'):>10} tok/s  x{row['time_vs_fp32']}")
    path = write_result("nf4_layer_speed", {"shape": [args.out_features, args.in_features], "tokens": args.tokens,
                                            "device": str(mx.default_device()), "rows": rows})
    print(json.dumps({"nf4_time_vs_fp32": rows["nf4_composed"]["time_vs_fp32"], "result": str(path)}))


if __name__ == "__main__":
    main()
