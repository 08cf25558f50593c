"""The Backend protocol: what the shared loop asks of MLX and of PyTorch.

A backend gets arrays and specs, never recipes or files. Trainable values cross the line
as numpy arrays named as in a Hugging Face PEFT adapter (without the `base_model.model.`
prefix), e.g. `transformer.h.0.attn.attention.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from twintune.data.batching import Batch
from twintune.methods import BaseModel, Plan
from twintune.models import GPTNeoSpec
from twintune.quant.nf4 import NF4Tensor


class Backend(Protocol):
    name: str
    sharded: bool  # whether each process holds only a shard of the trainable values (torch, train.fsdp)

    def __init__(self, spec: GPTNeoSpec, weights: dict[str, np.ndarray],
                 quantized: dict[str, NF4Tensor] | None = None, dtype: str = "float32") -> None:
        """Build the model from float weights; the layers in `quantized` arrive as shared NF4 bytes
        (their float weights are absent from `weights`). The frozen model is held and computes in
        `dtype` (float32, bfloat16 or float16; attention and the loss in float32); the trainable
        values, their gradients and the optimizer state are float32 in every dtype. `float64`
        (CPU only) computes everything in float64: the proof that both backends are one algorithm."""

    def apply_method(self, plan: Plan) -> None:
        """Perform the plan's surgeries (backends/X/surgery.py): from then on only the values the plan
        added or unfroze train, starting from the plan's initial values, each at its lr scale."""

    def undo_method(self, plan: Plan, base: BaseModel) -> None:
        """Reverse apply_method: wrapped layers unwrapped, unfrozen parameters back to the base's values."""

    def enable_gradient_checkpointing(self) -> None:
        """From now on keep only each block's input for the backward and recompute the block there."""

    def enable_compile(self) -> None:
        """Compile the training forward and backward (torch.compile / mx.compile): the same values,
        fewer framework calls per step; each new batch shape compiles once."""

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The current trainable values as numpy (float32; float64 in a float64 run)."""

    def set_optimizer(self, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        """Create the AdamW state for the trainable values."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW state as numpy: `m.NAME`, `v.NAME` per trainable value and `step` (for checkpoints)."""

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what optimizer_state returned."""

    def forward_backward(self, batch: Batch, loss_scale: float, dropout_key: int = 0) -> float:
        """Add the gradient of loss_scale * (summed label-token cross-entropy) to the
        accumulated gradients; return the unscaled summed loss. Dropout masks come from the shared
        generator under `dropout_key` (twintune/dropout.py): a pure function of the key, so a
        resumed run draws what an uninterrupted one draws, with no random state to save."""

    def optimizer_step(self, lr: float, max_grad_norm: float, grad_scale: float = 1.0) -> float:
        """Divide the gradients by grad_scale (float16 loss scaling), clip by global norm (if > 0),
        apply AdamW, clear gradients; return the norm before clipping. A non-finite norm skips
        the update (the gradients are cleared, the step count stays) and is returned as is."""

    def join(self, world) -> None:
        """Join the processes a launcher started (train/distributed.py's World): torch's process group
        (gloo on CPU, NCCL on CUDA), MLX's ring group. Afterwards sum_gradients and all_sum span them."""

    def whole_model(self):
        """A context in which every process holds the whole model, for an evaluation split unevenly
        across processes (torch with train.fsdp gathers its shards; otherwise nothing to do). Torch's
        backend also has `shard(world)`, FSDP2, called between join and set_optimizer."""

    def sum_gradients(self) -> None:
        """Sum the accumulated gradients over the processes (once per step, before the optimizer step)."""

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of `values` over the processes (float64 in, float64 out)."""

    def target_loss(self, batch: Batch) -> float:
        """The summed cross-entropy of the batch's targets, as forward_backward's loss but with no
        dropout and no gradient (a causal-LM evaluation)."""

    def label_logprobs(self, batch: Batch, label_token_ids: np.ndarray) -> np.ndarray:
        """(B, K) log-softmax scores at the answer positions, for the K label tokens (no dropout)."""

    def features(self, batch: Batch, pooling: str, layer: int | None = None) -> np.ndarray:
        """(B, d) the final hidden states (after ln_f) pooled over each row's prompt (Batch.pooling_weights),
        float32 (float64 in a float64 run), no dropout: a frozen model's sentence features. `layer` <
        the number of blocks: the hidden states after that many blocks (transformers' hidden_states[layer])."""

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """(B, T, V) full logits, float32 (float64 in a float64 run), for tests and generation."""

    def peak_memory_mb(self) -> float:
        """Peak memory the backend's allocator saw, in MiB (process RSS peak where it has none)."""


def adamw_update(p, g, m, v, step: int, lr: float, betas, eps: float, weight_decay: float, sqrt):
    """AdamW as torch.optim.AdamW computes it, written once for both backends' arrays.

    Decoupled weight decay first, then bias-corrected moments with epsilon added to
    sqrt(v_hat); the same order of operations as torch, so the two backends round alike.
    (mlx.optimizers.AdamW defaults differ: no bias correction, weight decay 0.01.)
    """
    b1, b2 = betas
    if weight_decay:  # a product with 1.0 changes no bit: skipped, a pass over every value fewer
        p = p * (1.0 - lr * weight_decay)
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * (g * g)
    denom = sqrt(v) / ((1.0 - b2**step) ** 0.5) + eps
    p = p - (lr / (1.0 - b1**step)) * (m / denom)
    return p, m, v


# Logits values (256 MB in float32) above which a loss over many target rows is summed in chunks
# of rows, each chunk's logits recomputed in the backward instead of kept (a causal-LM or
# instruction batch: every target row needs the whole vocabulary; a verbalizer's few rows never do).
LOSS_CHUNK_VALUES = 2**26


def loss_chunks(rows: int, vocabulary: int) -> list[tuple[int, int]]:
    """The (start, stop) row ranges a summed cross-entropy over `rows` target rows is computed in:
    one range while its (rows x vocabulary) logits fit LOSS_CHUNK_VALUES, else ranges of as many rows
    as fit (the same ranges on both backends, so their sums add in the same order).

    Example:
        >>> loss_chunks(5000, 50257)   # 1335 rows of 50257 logits fit 2**26 values
        [(0, 1335), (1335, 2670), (2670, 4005), (4005, 5000)]
    """
    if rows * vocabulary <= LOSS_CHUNK_VALUES:
        return [(0, rows)]
    step = max(1, LOSS_CHUNK_VALUES // vocabulary)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def trainable_dtype(dtype: str) -> str:
    """The dtype of the trainable values, their gradients, AdamW's state, attention and the loss."""
    return "float64" if dtype == "float64" else "float32"


def clip_factor(total_norm: float, max_grad_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ multiplies by."""
    if max_grad_norm <= 0:
        return 1.0
    return min(1.0, max_grad_norm / (total_norm + 1e-6))


def gradient_factor(scaled_norm: float, max_grad_norm: float, grad_scale: float) -> tuple[float, float | None]:
    """(the gradients' true norm, what to multiply the accumulated gradients by: unscale, then clip).

    The factor is None when the norm is not finite (an overflow under float16 loss scaling):
    the step is skipped.
    """
    norm = scaled_norm / grad_scale
    if not math.isfinite(norm):
        return norm, None
    return norm, clip_factor(norm, max_grad_norm) / grad_scale
