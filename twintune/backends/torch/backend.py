"""The PyTorch backend: our GPT-Neo (gpt_neo.py) + a method's plan (surgery.py), the training step, our AdamW."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from twintune.backends.base import (CAPABILITIES, ewc_gradient, ewc_penalty, gradient_factor, loss_chunks,
                                    trainable_dtype)
from twintune.backends.torch.gpt_neo import GPTNeoForCausalLM
from twintune.backends.torch.optimizer import TorchArrayOps, low_precision, new_state, update_value
from twintune.backends.torch.surgery import apply_plan, base_view, undo_plan
from twintune.data.batching import Batch
from twintune.dropout import dropout_masks
from twintune.errors import TwintuneError
from twintune.methods import BaseModel, Plan
from twintune.models import GPTNeoSpec
from twintune.optimizers import AdamW, Optimizer, PagedAdamW, pack_state, unpack_state
from twintune.quant.nf4 import NF4Tensor


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
LARGE_GRADIENTS_BYTES = 256 * 2**20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return None


def _return_freed_memory_to_the_os(trim: bool = False) -> None:
    """Give freed CPU memory of 1 MB and more back to the OS at once (glibc only); `trim` also
    releases what is already free (after loading a checkpoint, say).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB); past that,
    freed tensors stay in the heap, fragmented, and keep counting against the machine's memory.
    A fixed threshold stops that (figures in benchmarks/README.md): on the 125M shape, batch
    16 x 64, the training peak above the weights fell from 710 to ~450 MB with 1 MB (4 MB: no
    change, as its 3 MB activations stayed in the heap); on the 1.3B QLoRA step 4 MB already took
    the peak from 5648 to 3656 MB. The price is a page fault per fresh tensor: no difference we
    could measure on short sentences; a 128 KB threshold ran 40% slower.
    """
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 2**10)  # glibc's default, in case a full fine-tuning run raised it
    if trim:
        libc.malloc_trim(0)


def _keep_freed_memory_for_gradients() -> None:
    """Keep freed blocks of up to 32 MB (glibc's most) in the heap, and the heap untrimmed, when a plan
    trains so many values that its gradients, not its activations, fill the step.

    Full fine-tuning allocates every gradient afresh each step; at a 1 MB threshold each of those
    blocks is a new mapping whose every 4 KB page faults in (a fresh 154 MB buffer took 65 ms to
    zero where a reused one took 8). The step shapes repeat, so freed blocks are found again: at
    125M, full fine-tuning ran 12% faster; the peak RSS rose 1% at batch 8 and 20% at batch 16 x 64
    (2245 to 2693 MB, still 0.59x transformers'; benchmarks/README.md).
    """
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)


_return_freed_memory_to_the_os()  # before a checkpoint is read: its buffers go back when freed


ADAMW_CHUNK = 2**20  # elements: the five arrays of one chunk (20 MB in float32) stay in the CPU's caches


def adamw_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float, betas,
                  eps: float, weight_decay: float, grad_factor: float = 1.0, chunk: int = ADAMW_CHUNK) -> None:
    """`adamw_update` (backends/base.py) in place, on the gradient times `grad_factor` (unscaling and
    clipping; g is multiplied in place first): the same operations in the same order, so the same
    bits (tests/test_optim.py). On the CPU it walks the arrays in chunks of `chunk` elements through
    two scratch buffers: every operation then reads and writes cache, not memory, and no step
    allocates (with the 1 MB mmap threshold above, each full-size temporary was a fresh mapping
    and a page fault per 4 KB). Full fine-tuning's update at 125M: 0.32 s, against 1.8 s for
    full-size temporaries and 0.97 s for torch.optim.AdamW (benchmarks/README.md)."""
    b1, b2 = betas
    bias2_root = (1.0 - b2**step) ** 0.5
    step_size = lr / (1.0 - b1**step)

    def update(p, g, m, v, tmp, den):
        if grad_factor != 1.0:
            g.mul_(grad_factor)
        if weight_decay:  # a product with 1.0 changes no bit: skipped, a pass over every value fewer
            p.mul_(1.0 - lr * weight_decay)
        m.mul_(b1).add_(torch.mul(g, 1.0 - b1, out=tmp))
        v.mul_(b2).add_(torch.mul(g, g, out=tmp).mul_(1.0 - b2))
        torch.sqrt(v, out=den).div_(bias2_root).add_(eps)
        p.sub_(torch.div(m, den, out=tmp).mul_(step_size))

    g = g.contiguous()  # a gradient may come strided (a transposed use); m and v are laid out as p
    if p.device.type == "cuda" or not all(t.is_contiguous() for t in (p, m, v)):
        update(p, g, m, v, torch.empty_like(p), torch.empty_like(p))  # a GPU's allocator caches its blocks
        return
    flat = [t.view(-1) for t in (p, g, m, v)]
    scratch = _adamw_scratch(min(chunk, p.numel()), p.dtype, p.device)
    for start in range(0, p.numel(), chunk):
        piece = [t[start:start + chunk] for t in flat]
        update(*piece, *(buffer[:piece[0].numel()] for buffer in scratch))


_SCRATCH: dict = {}


def _adamw_scratch(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two buffers of at least `size` elements, kept per dtype and device (on the CPU: ADAMW_CHUNK)."""
    key = (dtype, device)
    if key not in _SCRATCH or _SCRATCH[key][0].numel() < size:
        _SCRATCH[key] = (torch.empty(size, dtype=dtype, device=device), torch.empty(size, dtype=dtype, device=device))
    return _SCRATCH[key]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (FSDP2: DTensor) tensor, a view that writes through; a plain
    tensor is its own."""
    return t.to_local() if hasattr(t, "device_mesh") else t


def _whole(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which `t` is this process's shard, laid out as `like` (a collective: every
    process calls it, in the same order); a plain `like` means `t` is whole already."""
    if not hasattr(like, "device_mesh"):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()).full_tensor()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A copy as numpy, bfloat16 (which numpy lacks) as float32: exact, and any backend reads it."""
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy().copy()


def _piece(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of a whole tensor, cut as `like` is, in memory of its own (no
    communication: each process holds the whole)."""
    if not hasattr(like, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local().clone()


class TorchOps:
    """tasks/objectives.py's Ops on torch tensors of one dtype and device."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device

    def array(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(self.device, self.dtype)

    exp, expm1 = staticmethod(torch.exp), staticmethod(torch.expm1)
    log, log1p = staticmethod(torch.log), staticmethod(torch.log1p)
    where = staticmethod(torch.where)
    log_sigmoid, relu = staticmethod(F.logsigmoid), staticmethod(torch.relu)
    minimum, maximum, clip = staticmethod(torch.minimum), staticmethod(torch.maximum), staticmethod(torch.clamp)

    @staticmethod
    def stop_gradient(x: torch.Tensor) -> torch.Tensor:
        return x.detach()


class TorchBackend:
    name = "torch"
    capabilities = CAPABILITIES["torch"]
    sharded = False  # train.fsdp on several processes: shard() splits weights, gradients and moments

    def __init__(self, spec: GPTNeoSpec, weights: dict[str, np.ndarray],
                 quantized: dict[str, NF4Tensor] | None = None, dtype: str = "float32"):
        self.spec = spec
        self.device = _device()
        if dtype == "float64" and self.device.type == "cuda":
            raise TwintuneError("dtype float64 runs on the CPU only: it is the proof mode in which both backends agree "
                                "to 1e-9, and a GPU runs float64 at a small fraction of its float32 speed (bitsandbytes "
                                "not at all); train with float32 or bfloat16 on CUDA.")
        self.precise = DTYPES[trainable_dtype(dtype)]
        self.model = GPTNeoForCausalLM(spec, weights, quantized, DTYPES[dtype]).to(self.device)
        self.model.requires_grad_(False)
        self.model.eval()
        self.step = 0
        self.lr_scales = {}
        _return_freed_memory_to_the_os(trim=True)

    def apply_method(self, plan: Plan) -> None:
        apply_plan(self.model, plan, np.float64 if self.precise == torch.float64 else np.float32, self.device)
        if self.device.type == "cpu" and plan.trainable_parameters() * self.precise.itemsize >= LARGE_GRADIENTS_BYTES:
            _keep_freed_memory_for_gradients()
        self.lr_scales = dict(plan.lr_scales)

    def undo_method(self, plan: Plan, base: BaseModel) -> None:
        """Take an applied plan off the model again (switching adapters on one loaded base)."""
        undo_plan(self.model, plan, base)
        self.lr_scales = {}

    def enable_gradient_checkpointing(self) -> None:
        self.model.checkpoint_blocks()

    def enable_compile(self) -> None:
        # In place (nn.Module.compile), so parameter names stay PEFT's; dynamic: batch shapes vary.
        self.model.transformer.compile(dynamic=True)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}

    # Sharded (train.fsdp), the values below are whole on every process: saving gathers the shards
    # (every process calls these, in the same order), loading cuts each process's own.
    @torch.no_grad()
    def trainable_state(self) -> dict[str, np.ndarray]:
        return {k: _numpy(_whole(_local(p), p)) for k, p in self._trainable().items()}

    def set_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        params = self._trainable()
        with torch.no_grad():
            for k, v in state.items():
                _local(params[k]).copy_(_piece(torch.from_numpy(v).to(self.device), params[k]))

    @property
    def has_cuda(self) -> bool:
        return self.device.type == "cuda"

    def set_optimizer(self, optimizer: Optimizer, weight_decay: float = 0.0) -> None:
        self.optimizer, self.weight_decay = optimizer, weight_decay
        self.states = {k: new_state(optimizer, _local(p)) for k, p in self._trainable().items()}
        self.array_ops = TorchArrayOps(self.device)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        params = self._trainable()
        return pack_state({name: {key: _numpy(_whole(value, params[name])) for key, value in state.items()}
                           for name, state in self.states.items()}, self.step)

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        params = self._trainable()
        saved, self.step = unpack_state(self.optimizer, state, {k: tuple(p.shape) for k, p in params.items()},
                                        {k for k, p in params.items() if low_precision(p)})
        for name, arrays in saved.items():
            for key, value in arrays.items():
                self.states[name][key].copy_(_piece(torch.from_numpy(value.copy()).to(self.device), params[name]))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, torch.long)

    def _hidden_rows(self, batch: Batch, rows: np.ndarray) -> torch.Tensor:
        shared = {} if batch.segments is None else {"positions": self._tensor(batch.positions),
                                                    "segments": self._tensor(batch.segments)}
        return self.model(self._tensor(batch.input_ids), self._tensor(batch.prompt_lengths), rows=self._tensor(rows),
                          **shared)

    def _dropout_masks(self, batch: Batch, dropout_key: int):
        """The micro-batch's dropout scope, for this batch's rows of it (twintune/dropout.py)."""
        return dropout_masks(*(torch.tensor(value, dtype=torch.int64, device=self.device)
                               for value in (dropout_key, batch.first_row, batch.width_pad)))

    def forward_backward(self, batch: Batch, loss_scale: float, dropout_key: int = 0) -> float:
        self.model.train()
        # The key stays set through the backward: gradient checkpointing's recompute runs there.
        with self._dropout_masks(batch, dropout_key):
            loss = self._summed_cross_entropy(self._hidden_rows(batch, batch.target_positions),
                                              self._tensor(batch.targets))
            (loss * loss_scale).backward()
        return loss.item()

    def _summed_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of the output layer's logits at these rows, summed. Vocabulary logits of
        many rows go in chunks (loss_chunks), each checkpointed: the backward recomputes one chunk's
        logits at a time instead of keeping (rows x vocabulary) of them."""
        def summed(h, t):
            return F.cross_entropy(self.model.logits(h).to(self.precise), t, reduction="sum")

        chunks = loss_chunks(hidden.shape[0], self.spec.vocab_size if self.model.score is None else 0)
        if len(chunks) == 1:
            return summed(hidden, targets)
        if not torch.is_grad_enabled():
            return sum(summed(hidden[a:b], targets[a:b]) for a, b in chunks)
        return sum(checkpoint(summed, hidden[a:b], targets[a:b], use_reentrant=False) for a, b in chunks)

    def _target_values(self, batch: Batch, reads: str, temperature: float = 1.0) -> torch.Tensor:
        """(N,) at the batch's targets: the target token's log-probability (of softmax(logits /
        temperature)), or a one-output head's score; "logps_values": (N, 2), the log-probability and
        the value head's estimate (PPO)."""
        hidden = self._hidden_rows(batch, batch.target_positions)
        if reads == "scores":
            return self.model.logits(hidden).to(self.precise)[:, 0]
        targets = self._tensor(batch.targets)

        def logps(h, t):
            logits = self.model.logits(h).to(self.precise)
            return -F.cross_entropy(logits if temperature == 1.0 else logits / temperature, t, reduction="none")

        chunks = loss_chunks(hidden.shape[0], self.spec.vocab_size if self.model.score is None else 0)
        if len(chunks) == 1 or not torch.is_grad_enabled():
            found = torch.cat([logps(hidden[a:b], targets[a:b]) for a, b in chunks])
        else:
            found = torch.cat([checkpoint(logps, hidden[a:b], targets[a:b], use_reentrant=False) for a, b in chunks])
        if reads == "logps_values":
            return torch.stack([found, self.model.v_head(hidden).to(self.precise)[:, 0]], dim=1)
        return found

    @torch.no_grad()
    def target_values(self, batch: Batch, reads: str, reference: bool = False, temperature: float = 1.0) -> np.ndarray:
        self.model.eval()
        with base_view(self.model, *self.view) if reference else contextlib.nullcontext():
            return self._target_values(batch, reads, temperature).cpu().numpy()

    def objective_backward(self, batch: Batch, objective, loss_scale: float, dropout_key: int = 0) -> np.ndarray:
        self.model.train()
        with self._dropout_masks(batch, dropout_key):
            values = self._target_values(batch, objective.reads, objective.temperature)
            loss, figures = objective.loss(TorchOps(self.precise, self.device), values, batch)
            (loss * loss_scale).backward()
        return np.array([loss.item(), *(float(f.detach()) for f in figures)], np.float64)

    @torch.no_grad()
    def optimizer_step(self, lr: float, max_grad_norm: float, grad_scale: float = 1.0) -> float:
        params = self._trainable()
        grads = [_local(p.grad) for p in params.values()]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.promote_types(
            grads[0].dtype, torch.float32))))
        if self.sharded:  # the global norm: clipping and skipped steps decide as one process would
            norm = self.all_sum(np.array([norm.item() ** 2], np.float64))[0] ** 0.5
        norm, factor = gradient_factor(float(norm), max_grad_norm, grad_scale)
        if factor is None:
            for p in params.values():
                p.grad = None
            return norm
        self.step += 1
        fused = type(self.optimizer) in (AdamW, PagedAdamW)  # AdamW's in-place path: the same bits, faster
        for name, p in params.items():
            scaled, state = lr * self.lr_scales.get(name, 1.0), self.states[name]
            if fused and not low_precision(p):
                adamw_update_(_local(p), _local(p.grad), state["m"], state["v"], self.step, scaled,
                              self.optimizer.betas, self.optimizer.eps, self.weight_decay, grad_factor=factor)
            else:
                update_value(self.optimizer, self.array_ops, _local(p).data, _local(p.grad), state, self.step, scaled,
                             self.weight_decay, grad_factor=factor)
            p.grad = None
        return norm

    def join(self, world) -> None:
        import datetime

        import torch.distributed as dist

        seconds = world.timeout
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=world.rank,
                                        world_size=world.size, timeout=datetime.timedelta(seconds=seconds))
            except (RuntimeError, dist.DistError):
                others = world.size - 1
                raise TwintuneError(f"process {world.rank} of {world.size} waited {seconds:g} s for the other {others} "
                                    f"process{'es' if others > 1 else ''} to join; start them all at once "
                                    f"(torchrun --nproc_per_node={world.size}, or twintune train --nproc "
                                    f"{world.size}).") from None
        if dist.get_world_size() != world.size:
            raise TwintuneError(f"torchrun announced {world.size} processes, but the process group holds "
                                f"{dist.get_world_size()}.")

    def shard(self, world) -> None:
        """FSDP2 (train.fsdp, full fine-tuning): every block, then the rest of the model, split by rows
        across the joined processes (torch.distributed.fsdp.fully_shard). Each process then holds its
        shard of the weights, gradients and AdamW moments; a block's whole weights exist only while it
        runs. Gradients are summed (divide factor 1), as sum_gradients sums them: the loss is already
        over the step's global count of targets. Before set_optimizer, so no whole moment is allocated."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(self.device.type, (world.size,))
        self.fsdp_blocks = list(self.model.transformer.h)
        for block in self.fsdp_blocks:
            fully_shard(block, mesh=mesh)
            register_fsdp_forward_method(block, "at_rows")  # the last block's run at a loss's rows gathers too
        fully_shard(self.model, mesh=mesh)  # the root: embeddings (the tied output layer), ln_f, a head
        for module in (*self.fsdp_blocks, self.model):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no PREMUL_SUM
        self.sharded = True
        # The whole weights are freed now; and the shards' gradients are small, while each block's
        # gathered weights come and go twice a step: return what is freed (1 MB and up) to the OS.
        _return_freed_memory_to_the_os(trim=True)

    @contextlib.contextmanager
    def whole_model(self):
        """Evaluation on a sharded model: each block's shards are gathered once, so every process can
        run its own share of the batches, however many, with no collective until the results are
        summed; sharded again afterwards. Not sharded: nothing to do."""
        if not self.sharded:
            yield
            return
        for block in self.fsdp_blocks:
            block.set_reshard_after_forward(False, recurse=False)
        for module in (self.model, *self.fsdp_blocks):
            module.unshard()
        try:
            yield
        finally:
            for module in (*self.fsdp_blocks, self.model):
                module.reshard()
            for block in self.fsdp_blocks:
                block.set_reshard_after_forward(True, recurse=False)

    def sum_gradients(self) -> None:
        """One all-reduce of every gradient, flattened (what DDP does, without overlapping the backward).
        Sharded, each backward has already summed its gradients into the shards (reduce-scatter)."""
        import torch.distributed as dist

        if self.sharded:
            return
        params = list(self._trainable().values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).to(p.dtype)  # (a bfloat16 value's gradient, summed in float32 beside others)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        summed = torch.from_numpy(np.asarray(values, np.float64).copy()).to(self.device)
        dist.all_reduce(summed)
        return summed.cpu().numpy()

    def leave(self) -> None:
        # A process that exits while another still uses gloo's connections can abort it (SIGABRT seen
        # on loopback): all wait for the last, then the group is closed on every process.
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def set_base_view(self, plan: Plan, start: dict[str, np.ndarray]) -> None:
        """What distill_backward's teacher switches off: the plan's surgeries, and the start's values of
        the parameters it unfroze (a frozen copy of those: full fine-tuning's cost of distillation)."""
        unfrozen = set(plan.unfrozen())
        self.view = (plan, {k: torch.from_numpy(np.array(v)).to(self.device, self.model_dtype(k)) for k, v in start.items()
                            if k in unfrozen})

    def model_dtype(self, name: str) -> torch.dtype:
        return self.model.get_parameter(name).dtype

    def distill_backward(self, batch: Batch, temperature: float, scale: float, dropout_key: int = 0) -> float:
        """Backward of scale * T^2 * sum over the batch's targets of KL(base || model) at temperature T,
        the base being this model with the method off (set_base_view); returns the sum."""
        with torch.no_grad(), base_view(self.model, *self.view):
            self.model.eval()
            teacher = F.log_softmax(self.model.logits(self._hidden_rows(batch, batch.target_positions)).to(self.precise)
                                    / temperature, dim=-1)
        self.model.train()
        with self._dropout_masks(batch, dropout_key):
            student = F.log_softmax(self.model.logits(self._hidden_rows(batch, batch.target_positions)).to(self.precise)
                                    / temperature, dim=-1)
            divergence = (teacher.exp() * (teacher - student)).sum() * temperature**2
            (divergence * scale).backward()
        return divergence.item()

    def take_gradients(self) -> dict[str, np.ndarray]:
        """The gradients accumulated since the last step, by name (zero where none flowed), then cleared."""
        taken = {}
        for name, p in self._trainable().items():
            taken[name] = _numpy(p.grad) if p.grad is not None else \
                np.zeros(tuple(p.shape), np.float64 if self.precise == torch.float64 else np.float32)
            p.grad = None
        return taken

    def set_penalty(self, fisher: dict[str, np.ndarray], anchor: dict[str, np.ndarray], weight: float) -> None:
        """EWC's weight * sum(F * (value - anchor)^2) over the trainable values (train/guards.py)."""
        self.penalty_terms = {k: (self._values(fisher[k]), self._values(anchor[k])) for k in fisher}
        self.penalty_weight = weight

    def _values(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.precise)

    @torch.no_grad()
    def penalty(self) -> float:
        params = self._trainable()
        return ewc_penalty(self.penalty_weight, ((params[k], f, a) for k, (f, a) in self.penalty_terms.items()), float)

    @torch.no_grad()
    def add_penalty_gradients(self, grad_scale: float = 1.0) -> None:
        """Add the penalty's gradient (ewc_gradient), times the loss scale, to the gradients."""
        params = self._trainable()
        for name, (fisher, anchor) in self.penalty_terms.items():
            p = params[name]
            extra = ewc_gradient(p, fisher, anchor, self.penalty_weight, grad_scale)
            # in float32, rounded once to a bfloat16 value's own dtype (its gradient's)
            p.grad = (extra if p.grad is None else p.grad + extra).to(p.dtype)

    @torch.no_grad()
    def target_loss(self, batch: Batch) -> float:
        self.model.eval()
        return self._summed_cross_entropy(self._hidden_rows(batch, batch.target_positions),
                                          self._tensor(batch.targets)).item()

    @torch.no_grad()
    def label_logprobs(self, batch: Batch, label_token_ids: np.ndarray) -> np.ndarray:
        self.model.eval()
        logits = self.model.logits(self._hidden_rows(batch, batch.answer_positions)).to(self.precise)
        return torch.log_softmax(logits, dim=-1)[:, self._tensor(label_token_ids)].cpu().numpy()

    @torch.no_grad()
    def features(self, batch: Batch, pooling: str, layer: int | None = None) -> np.ndarray:
        self.model.eval()
        hidden = self.model(self._tensor(batch.input_ids), self._tensor(batch.prompt_lengths), layer).to(self.precise)
        weights = torch.from_numpy(batch.pooling_weights(pooling)).to(device=self.device, dtype=self.precise)
        return torch.einsum("bt,btd->bd", weights, hidden).cpu().numpy()

    @torch.no_grad()
    def logits(self, input_ids: np.ndarray, prompt_lengths: np.ndarray | None = None) -> np.ndarray:
        self.model.eval()
        lengths = None if prompt_lengths is None else self._tensor(prompt_lengths)
        return self.model.logits(self.model(self._tensor(input_ids), lengths)).to(self.precise).cpu().numpy()

    def make_cache(self) -> list:
        """An empty key/value cache for next_token_logits."""
        return self.model.make_cache()

    @torch.no_grad()
    def next_token_logits(self, input_ids: np.ndarray, cache: list) -> np.ndarray:
        """The vocabulary scores (rows, vocabulary) after the last of each row of `input_ids` (rows,
        tokens), which continue the positions `cache` holds and are added to it."""
        self.model.eval()
        hidden = self.model(self._tensor(input_ids), cache=cache)
        return self.model.logits(hidden[:, -1]).to(self.precise).cpu().numpy()

    def framework_peak_mb(self) -> float | None:
        """The CUDA allocator's peak; None on the CPU, where torch keeps no count (the process's peak RSS
        is the measure there)."""
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None

    def set_memory_limit(self, limit_bytes: int) -> None:
        if self.device.type == "cuda":  # an allocation past it raises CUDA's out-of-memory error at once
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), self.device)
