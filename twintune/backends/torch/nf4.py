"""NF4 linear layers in PyTorch: bitsandbytes' Linear4bit, checked, or our own NF4 layer.

The bytes come from twintune/quant/nf4.py, already quantized: bitsandbytes receives them as a
ready `Params4bit` with its `QuantState` and quantizes nothing again, so both backends
dequantize the very same codes. Runs on CUDA, and on the CPU (slowly) for the tests.

A library kernel is checked, not trusted (docs: DESIGN "Parity"). When a layer is built,
bitsandbytes dequantizes it once and the result must equal, bit for bit, our dequantization in
composed torch ops (the maths of twintune/quant/nf4.py and of the MLX layer). Where it does not,
the layer is our `NF4Linear` instead: the same bytes, dequantized by those composed ops in every
forward and backward. Known case: bitsandbytes 0.50's CPU kernel, on CPUs with AVX-512F, takes
a vector path for widths that are a multiple of 16 that looks each row's absmax up as if every row
started a new quantization block; bitsandbytes quantizes the flattened weight, so in a layer
whose width is not a multiple of the blocksize, blocks straddle rows and that path scales most
weights by another block's absmax. float64 (which bitsandbytes cannot compute in) uses
`NF4Linear` too.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from twintune.quant.nf4 import ABSMAX_BLOCKSIZE, DYNAMIC_MAP, NF4_LEVELS, NF4Tensor

# Each byte's two levels (high nibble first): one gather per byte, as the MLX layer does.
_BYTE_LEVELS = np.stack([NF4_LEVELS[np.arange(256) >> 4], NF4_LEVELS[np.arange(256) & 0x0F]], axis=1)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], blocksize: int,
               byte_levels: torch.Tensor | None = None) -> torch.Tensor:
    """float32 weights from packed NF4 indices and per-block float32 absmax (composed torch ops).

    Level × block absmax, one float32 multiply per weight: bit for bit numpy's `dequantize_nf4`
    and the MLX layer's. `byte_levels` is the (256, 2) table of each byte's two levels, passed by
    a layer that keeps it on its device.

    Example:
        >>> from twintune.quant.nf4 import dequantize_nf4, quantize_nf4
        >>> q = quantize_nf4(np.linspace(-1, 1, 96 * 3, dtype=np.float32).reshape(3, 96), double_quant=False)
        >>> w = dequantize(torch.from_numpy(q.packed), torch.from_numpy(q.absmax), q.shape, q.blocksize)
        >>> bool(np.array_equal(w.numpy(), dequantize_nf4(q)))
        True
    """
    if byte_levels is None:
        byte_levels = torch.from_numpy(_BYTE_LEVELS).to(packed.device)
    n = shape[0] * shape[1]
    values = byte_levels[packed.int()].reshape(-1)  # int32 indices: a uint8 index would be a mask
    if n % blocksize == 0 and values.numel() == n:
        return (values.view(-1, blocksize) * absmax[:, None]).view(shape)
    # a short last block, or a padding nibble after an odd count: scale value by value, then cut
    return (values[:n] * absmax.repeat_interleave(blocksize)[:n]).view(shape)


def decode_absmax(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Double quantization undone: dynamic-map level × block scale + mean, in float32.

    Example:
        >>> from twintune.quant.nf4 import nf4_absmax, quantize_nf4
        >>> q = quantize_nf4(np.random.default_rng(0).normal(size=(64, 96)).astype(np.float32))
        >>> absmax = decode_absmax(torch.from_numpy(q.absmax), torch.from_numpy(q.absmax_scale),
        ...                        torch.tensor(q.absmax_offset))
        >>> bool(np.array_equal(absmax.numpy(), nf4_absmax(q)))
        True
    """
    levels = torch.from_numpy(DYNAMIC_MAP).to(codes.device)[codes.int()]
    return levels * scales.repeat_interleave(ABSMAX_BLOCKSIZE)[: codes.numel()] + offset


def _block_absmax(weight: NF4Tensor, device: str | torch.device) -> torch.Tensor:
    """The float32 absmax of every block, decoded here when double-quantized (eager ops, so the
    multiply and the add round separately, as in numpy)."""
    absmax = torch.from_numpy(weight.absmax.copy()).to(device)
    if not weight.double_quant:
        return absmax
    scales = torch.from_numpy(weight.absmax_scale.copy()).to(device)
    return decode_absmax(absmax, scales, torch.tensor(np.float32(weight.absmax_offset), device=device))


class _NF4Matmul(torch.autograd.Function):
    """F.linear(x, W, bias) with W dequantized in the forward and again in the backward: no float
    weight stays alive in between. The gradient goes to the input only (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, byte_levels, bias, shape, blocksize):
        ctx.save_for_backward(packed, absmax, byte_levels)  # the layer's own buffers: no copy
        ctx.shape, ctx.blocksize = shape, blocksize
        weight = dequantize(packed, absmax, shape, blocksize, byte_levels).to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        packed, absmax, byte_levels = ctx.saved_tensors
        weight = dequantize(packed, absmax, ctx.shape, ctx.blocksize, byte_levels).to(grad.dtype)
        return grad @ weight, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (bitsandbytes' layout), computing in its input's dtype:
    the weight is dequantized in float32 (composed torch ops), then rounded once to it (float64:
    exact). The mirror of backends/mlx/nf4.py's NF4Linear.

    The block absmax is decoded once here rather than kept as 8-bit codes (4 bytes per block of
    64 weights instead of 1, about 9% more than bitsandbytes keeps): the forward and backward
    are then one multiply per weight, the same bits however torch vectorizes or fuses them (a
    compiled decode could fuse its multiply-add into one FMA and round once where numpy rounds
    twice), and this layer is the exception path, so the bytes matter less than the exactness.

    `bitsandbytes_mismatch` holds why bitsandbytes was not used (None when nothing was wrong
    with it, as in float64).

    Example:
        >>> from twintune.quant.nf4 import dequantize_nf4, quantize_nf4
        >>> q = quantize_nf4(np.random.default_rng(0).normal(size=(8, 96)).astype(np.float32))
        >>> layer = NF4Linear(q, None)
        >>> x = torch.ones(2, 96)
        >>> bool(torch.equal(layer(x), F.linear(x, torch.from_numpy(dequantize_nf4(q)))))
        True
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.shape = tuple(weight.shape)
        self.blocksize = weight.blocksize
        self.compute_dtype = compute_dtype
        self.bitsandbytes_mismatch: str | None = None
        self.register_buffer("packed", torch.from_numpy(weight.packed.copy()).to(device))
        self.register_buffer("absmax", _block_absmax(weight, device))
        self.register_buffer("byte_levels", torch.from_numpy(_BYTE_LEVELS).to(device), persistent=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight these bytes hold."""
        return dequantize(self.packed, self.absmax, self.shape, self.blocksize, self.byte_levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self.packed, self.absmax, self.byte_levels, self.bias, self.shape, self.blocksize)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}"


def import_bitsandbytes():
    """bitsandbytes, imported quietly. On a CPU with AVX512-BF16 its import tries to fetch a bfloat16
    kernel from the hub and logs "install kernels / trust_remote_code" (or, offline, that it skipped a
    trust check) when it cannot. twintune never runs that kernel (support_avx512bf16_for_cpu stays
    off below), so those lines are noise a user cannot act on; other messages pass."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return bitsandbytes


def quant_state(weight: NF4Tensor, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """bitsandbytes' QuantState describing a shared NF4Tensor."""
    import_bitsandbytes()
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


def _packed(weight: NF4Tensor, device: str | torch.device) -> torch.Tensor:
    return torch.from_numpy(weight.packed.copy()).reshape(-1, 1).to(device)


def bitsandbytes_dequantize(weight: NF4Tensor, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """bitsandbytes' own dequantization of a shared NF4Tensor (`bitsandbytes.functional.dequantize_4bit`
    of the bytes and QuantState a Linear4bit holds, i.e. what it computes with).

    Example:
        >>> from twintune.quant.nf4 import quantize_nf4
        >>> bitsandbytes_dequantize(quantize_nf4(np.ones((4, 64), np.float32))).unique().tolist()
        [1.0]
    """
    import_bitsandbytes()
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(_packed(weight, device), quant_state(weight, dtype, device))


def _cpu_has_avx512f() -> bool:
    """Whether bitsandbytes' CPU library sees AVX-512F here (its kernel's vector path needs it)."""
    try:
        import_bitsandbytes()
        from bitsandbytes.functional import lib

        return bool(lib.has_avx512f_cpu())
    except (AttributeError, ImportError, OSError):
        return False


def _mismatch_reason(weight: NF4Tensor, device: str | torch.device) -> str:
    rows, width = weight.shape
    straddle = rows > 1 and width % weight.blocksize != 0
    if torch.device(device).type == "cpu" and straddle and width % 16 == 0 and _cpu_has_avx512f():
        return "its CPU kernel's AVX-512 path assumes quantization blocks never straddle rows"
    return f"its 4-bit kernel on {torch.device(device).type} gives other values than these NF4 codes hold"


def _bitsandbytes_linear(weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                         device: str | torch.device) -> nn.Module:
    bnb = import_bitsandbytes()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=weight.double_quant, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(
        data=_packed(weight, device), requires_grad=False,
        quant_state=quant_state(weight, compute_dtype, device), blocksize=weight.blocksize,
        compress_statistics=weight.double_quant, quant_type="nf4", bnb_quantized=True, module=layer)
    # On CPUs with AVX512-BF16, Linear4bit in eval mode would repack the weight for a bfloat16-only
    # kernel at its first no-grad forward (the model is always in eval mode here): activations and
    # absmax rounded to bfloat16 whatever compute_dtype says, and, once repacked, a path with no
    # autograd. Both backends must compute in the dtype asked for, so that path stays off.
    layer.support_avx512bf16_for_cpu = False
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)
    layer.requires_grad_(False)
    return layer


def nf4_linear(weight: NF4Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> nn.Module:
    """A frozen layer holding exactly these NF4 bytes: bitsandbytes' `Linear4bit` where it
    dequantizes them to our weights bit for bit (checked once, here), else our `NF4Linear`
    with `bitsandbytes_mismatch` saying why (see `warn_about_bitsandbytes_mismatches`).
    float64 is always `NF4Linear`: bitsandbytes has no float64 kernels.

    Example:
        >>> from twintune.quant.nf4 import quantize_nf4
        >>> q = quantize_nf4(np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
        >>> type(nf4_linear(q, None)).__name__, type(nf4_linear(q, None, torch.float64)).__name__
        ('Linear4bit', 'NF4Linear')
    """
    if compute_dtype == torch.float64:
        return NF4Linear(weight, bias, compute_dtype, device)
    theirs = bitsandbytes_dequantize(weight, compute_dtype, device)
    ours = dequantize(_packed(weight, device), _block_absmax(weight, device), weight.shape, weight.blocksize)
    agree = torch.equal(theirs, ours.to(compute_dtype))
    del theirs, ours  # one weight-sized pair, freed before the next layer is checked
    if agree:
        return _bitsandbytes_linear(weight, bias, compute_dtype, device)
    layer = NF4Linear(weight, bias, compute_dtype, device)
    layer.bitsandbytes_mismatch = _mismatch_reason(weight, device)
    return layer


def warn_about_bitsandbytes_mismatches(layers: Iterable[nn.Module]) -> None:
    """One warning for a model's layers that use NF4Linear because bitsandbytes got them wrong,
    naming their distinct shapes and the reason (nothing when there are none)."""
    wrong = [layer for layer in layers if getattr(layer, "bitsandbytes_mismatch", None)]
    if not wrong:
        return
    shapes = ", ".join(str(shape) for shape in sorted({layer.shape for layer in wrong}))
    reasons = "; ".join(sorted({layer.bitsandbytes_mismatch for layer in wrong}))
    warnings.warn(
        f"bitsandbytes dequantizes NF4 layers of shape {shapes} wrongly on this machine ({reasons}); "
        "those layers use twintune's own NF4 dequantization (the same weights as the MLX backend).",
        stacklevel=2)
