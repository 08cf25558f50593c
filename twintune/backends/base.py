"""The Backend protocol: what the shared loop asks of MLX and of PyTorch.

A backend gets arrays and specs, never recipes or files. Trainable values cross the line
as numpy arrays named as in a Hugging Face PEFT adapter (without the `base_model.model.`
prefix), e.g. `transformer.h.0.attn.attention.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol

import numpy as np

from twintune.data.batching import Batch
from twintune.methods import BaseModel, Plan
from twintune.methods.base import Layer
from twintune.optimizers import Optimizer


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond what every backend does, declared on its class, so that no caller
    outside backends/ asks `hasattr` or a backend's name."""

    launcher: str  # what starts its processes: torchrun | mlx.launch
    quantizations: tuple[str, ...] = ()  # the recipe's quantize.type values it runs (besides none)
    sharding: bool = False  # shard(): FSDP2 for full fine-tuning (train.fsdp)
    mlx_lm_models: bool = False  # from_mlx_lm(): models of mlx-lm's families
    pipelined_greedy: bool = False  # greedy_tokens(): greedy decoding with the next step queued


# What each backend can do, readable without importing its framework (backends/__init__.py's
# capabilities(name); each backend class takes its own from here).
CAPABILITIES = {
    "mlx": Capabilities(launcher="mlx.launch", quantizations=("nf4", "affine"), mlx_lm_models=True,
                        pipelined_greedy=True),
    "torch": Capabilities(launcher="torchrun", quantizations=("nf4",), sharding=True),
}


class LayerRegistry(dict):
    """A backend's layer modules by the `Layer` class a surgery carries (backends/X/methods/registry.py):
    each layer file registers its module with `@LAYERS.builds(TheLayer)`."""

    def builds(self, layer: type[Layer]):
        """Register the decorated class as the module that builds `layer`."""
        def register(cls: type) -> type:
            self[layer] = cls
            return cls
        return register


class ModelComputation(Protocol):
    """What the loop, evaluation and generation compute with the model."""

    spec: object  # the model's spec (GPTNeoSpec, or an mlx-lm model's)

    def apply_method(self, plan: Plan) -> None:
        """Perform the plan's surgeries (backends/X/surgery.py): from then on only the values the plan
        added or unfroze train, starting from the plan's initial values, each at its lr scale."""

    def undo_method(self, plan: Plan, base: BaseModel) -> None:
        """Reverse apply_method: wrapped layers unwrapped, unfrozen parameters back to the base's values."""

    def quantize_affine(self, bits: int, group_size: int) -> None:
        """MLX's affine quantization of every block linear layer (capabilities.quantizations has "affine")."""

    def base_weights(self) -> Mapping[str, np.ndarray]:
        """The model's own weights by name, as numpy when read: planning on a model built elsewhere
        (capabilities.mlx_lm_models)."""

    def enable_gradient_checkpointing(self) -> None:
        """From now on keep only each block's input for the backward and recompute the block there."""

    def enable_compile(self) -> None:
        """Compile the training forward and backward (torch.compile / mx.compile): the same values,
        fewer framework calls per step; each new batch shape compiles once."""

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The current trainable values as numpy (float32; float64 in a float64 run)."""

    def set_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Set the trainable values (names as trainable_state gives them)."""

    def forward_backward(self, batch: Batch, loss_scale: float, dropout_key: int = 0) -> float:
        """Add the gradient of loss_scale * (summed label-token cross-entropy) to the
        accumulated gradients; return the unscaled summed loss. Dropout masks come from the shared
        generator under `dropout_key` (twintune/dropout.py): a pure function of the key, so a
        resumed run draws what an uninterrupted one draws, with no random state to save."""

    def objective_backward(self, batch: Batch, objective, loss_scale: float, dropout_key: int = 0) -> np.ndarray:
        """Add the gradient of loss_scale * an objective's summed loss (tasks/objectives.py: a preference
        loss, Bradley-Terry) to the accumulated gradients. The objective gets the model's values at the
        batch's targets (its `reads`), with dropout, and this backend's Ops; returns float64
        [loss, *figures], their unscaled sums."""

    def target_values(self, batch: Batch, reads: str, reference: bool = False, temperature: float = 1.0) -> np.ndarray:
        """(N,) the model's values at the batch's targets, no dropout, no gradient: the target token's
        log-probability of softmax(logits / temperature) (`reads` "logps"), a one-output head's score
        ("scores"), or (N, 2) both the log-probability and the value head's estimate ("logps_values",
        PPO); with `reference`, of the base with the method off (set_base_view): a preference loss's
        reference model."""

    def take_gradients(self) -> dict[str, np.ndarray]:
        """The gradients accumulated since the last step, by name, then cleared (EWC's Fisher)."""

    def set_base_view(self, plan: Plan, start: dict[str, np.ndarray]) -> None:
        """What distill_backward's teacher switches off: the plan's surgeries, and the start's values of
        the parameters it unfroze."""

    def distill_backward(self, batch: Batch, temperature: float, scale: float, dropout_key: int = 0) -> float:
        """Backward of scale * T^2 * sum over the batch's targets of KL(base || model) at temperature T,
        the base being this model with the method off (set_base_view); returns the sum."""

    def set_penalty(self, fisher: dict[str, np.ndarray], anchor: dict[str, np.ndarray], weight: float) -> None:
        """EWC's terms (ewc_penalty, ewc_gradient) over the trainable values."""

    def penalty(self) -> float:
        """EWC's penalty at the current values."""

    def add_penalty_gradients(self, grad_scale: float = 1.0) -> None:
        """Add EWC's gradient, times the loss scale, to the accumulated gradients."""

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

    def make_cache(self) -> list:
        """An empty key/value cache for next_token_logits."""

    def next_token_logits(self, input_ids: np.ndarray, cache: list) -> np.ndarray:
        """The vocabulary scores (rows, vocabulary) after the last of each row of `input_ids` (rows,
        tokens), which continue the positions `cache` holds and are added to it."""

    def greedy_tokens(self, prompt_ids: list[int], cache: list, count: int) -> Iterator[int]:
        """Greedy tokens after the prompt, pipelined (capabilities.pipelined_greedy only)."""

    def framework_peak_mb(self) -> float | None:
        """The framework allocator's peak, in MiB (MLX's arrays, CUDA's tensors); None where it keeps no
        count (torch on the CPU). summary.json's peak_memory_mb is the process's peak RSS on both."""

    def set_memory_limit(self, limit_bytes: int) -> None:
        """train.memory_limit_gb: the framework allocator's limit (MLX's memory and wired limits; CUDA's
        per-process fraction); nothing on torch's CPU, which has none (the estimate is checked before)."""


class OptimizerState(Protocol):
    """The optimizer's state, kept by the backend in its own arrays (twintune/optimizers.py names it)."""

    has_cuda: bool  # whether it computes on a CUDA GPU (paged optimizers need one)

    def set_optimizer(self, optimizer: Optimizer, weight_decay: float = 0.0) -> None:
        """Create the optimizer's state for the trainable values (zeros: its step 0)."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The state as numpy, named as `pack_state` names it (for checkpoints)."""

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what optimizer_state returned."""

    def optimizer_step(self, lr: float, max_grad_norm: float, grad_scale: float = 1.0) -> float:
        """Divide the gradients by grad_scale (float16 loss scaling), clip by global norm (if > 0),
        apply the optimizer, clear gradients; return the norm before clipping. A non-finite norm skips
        the update (the gradients are cleared, the step count stays) and is returned as is."""


class Processes(Protocol):
    """Training on several processes (train/distributed.py's World)."""

    sharded: bool  # whether each process holds only a shard of the trainable values (torch, train.fsdp)

    def join(self, world) -> None:
        """Join the processes a launcher started: torch's process group (gloo on CPU, NCCL on CUDA),
        MLX's ring group. Afterwards sum_gradients and all_sum span them."""

    def shard(self, world) -> None:
        """Shard the model across the joined processes (capabilities.sharding only), before set_optimizer."""

    def whole_model(self) -> contextlib.AbstractContextManager:
        """A context in which every process holds the whole model, for an evaluation split unevenly
        across processes (torch with train.fsdp gathers its shards; otherwise nothing to do)."""

    def sum_gradients(self) -> None:
        """Sum the accumulated gradients over the processes (once per step, before the optimizer step)."""

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of `values` over the processes (float64 in, float64 out)."""

    def leave(self) -> None:
        """Wait until every process is done, then close the group (the end of a run of several processes)."""


class Backend(ModelComputation, OptimizerState, Processes, Protocol):
    """What the shared loop asks of MLX and of PyTorch: the three roles above, its name and what it
    can do beyond them. A backend is built from float weights and NF4 bytes:

        Backend(spec, weights, quantized=None, dtype="float32")

    The layers in `quantized` arrive as shared NF4 bytes (their float weights are absent from
    `weights`). The frozen model is held and computes in `dtype` (float32, bfloat16 or float16;
    attention and the loss in float32); the trainable values, their gradients and the optimizer state
    are float32 in every dtype. `float64` (CPU only) computes everything in float64: the proof that
    both backends are one algorithm."""

    name: str
    capabilities: Capabilities

    @classmethod
    def from_mlx_lm(cls, directory, dtype: str = "float32") -> "Backend":
        """A model directory of one of mlx-lm's families, ready to adapt (capabilities.mlx_lm_models)."""


def ewc_penalty(weight: float, terms, to_float) -> float:
    """EWC's weight * sum(F * (value - anchor)^2) over (value, F, anchor) triples of any array library's
    arrays (train/guards.py says why); `to_float` reads a 0-d array."""
    return weight * sum(to_float((fisher * (value - anchor) ** 2).sum()) for value, fisher, anchor in terms)


def ewc_gradient(value, fisher, anchor, weight: float, grad_scale: float):
    """EWC's gradient of one value, 2 * weight * F * (value - anchor), times the loss scale."""
    return (2 * weight * grad_scale) * fisher * (value - anchor)


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
