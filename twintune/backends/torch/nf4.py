"""NF4 linear layers in PyTorch: bitsandbytes' Linear4bit built from the shared NF4 bytes.

The bytes come from twintune/quant/nf4.py, already quantized: bitsandbytes receives them as a
ready `Params4bit` with its `QuantState` and quantizes nothing again, so both backends
dequantize the very same codes. Runs on CUDA, and on the CPU (slowly) for the tests.
"""

from __future__ import annotations

import torch

from twintune.quant.nf4 import ABSMAX_BLOCKSIZE, DYNAMIC_MAP, NF4_LEVELS, NF4Tensor


def quant_state(weight: NF4Tensor, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """bitsandbytes' QuantState describing a shared NF4Tensor."""
    from bitsandbytes.functional import QuantState

    def tensor(array):
        return torch.from_numpy(array.copy()).to(device)

    if not weight.double_quant:
        return QuantState(absmax=tensor(weight.absmax), shape=torch.Size(weight.shape), code=tensor(NF4_LEVELS),
                          blocksize=weight.blocksize, quant_type="nf4", dtype=dtype)
    nested = QuantState(absmax=tensor(weight.absmax_scale), code=tensor(DYNAMIC_MAP),
                        blocksize=ABSMAX_BLOCKSIZE, dtype=torch.float32)
    return QuantState(absmax=tensor(weight.absmax), shape=torch.Size(weight.shape), code=tensor(NF4_LEVELS),
                      blocksize=weight.blocksize, quant_type="nf4", dtype=dtype,
                      offset=torch.tensor(float(weight.absmax_offset), dtype=torch.float32, device=device),
                      state2=nested)


def nf4_linear(weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """A frozen `bitsandbytes.nn.Linear4bit` holding exactly these NF4 bytes."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=weight.double_quant, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(
        data=torch.from_numpy(weight.packed.copy()).reshape(-1, 1).to(device), requires_grad=False,
        quant_state=quant_state(weight, compute_dtype, device), blocksize=weight.blocksize,
        compress_statistics=weight.double_quant, quant_type="nf4", bnb_quantized=True, module=layer)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)
    layer.requires_grad_(False)
    return layer


def dequantize(weight: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bitsandbytes' own dequantization of a shared NF4Tensor (what Linear4bit computes with)."""
    from bitsandbytes.functional import dequantize_4bit

    packed = torch.from_numpy(weight.packed.copy()).reshape(-1, 1)
    return dequantize_4bit(packed, quant_state(weight, dtype))
