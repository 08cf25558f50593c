"""The MLX backend: our GPT-Neo (gpt_neo.py) + a method's plan (surgery.py), the training step, our AdamW."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from twintune.backends.base import (CAPABILITIES, ewc_gradient, ewc_penalty, gradient_factor, loss_chunks,
                                    trainable_dtype)
from twintune.backends.mlx.gpt_neo import GPTNeoForCausalLM, exp, logsumexp
from twintune.backends.mlx.optimizer import MLXArrayOps, low_precision, new_state, update_value
from twintune.backends.mlx.nf4 import NF4Linear
from twintune.backends.mlx.surgery import apply_plan, base_view, undo_plan, get_submodule, set_submodule
from twintune.data.batching import Batch
from twintune.dropout import dropout_masks
from twintune.errors import TwintuneError
from twintune.methods import BaseModel, Plan
from twintune.models import GPTNeoSpec
from twintune.optimizers import Optimizer, pack_state, unpack_state
from twintune.quant.nf4 import NF4Tensor


DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16, "float64": mx.float64}


def _check_dtype(dtype: str) -> None:
    if dtype == "float64" and mx.default_device() != mx.cpu:
        raise TwintuneError("dtype float64 runs on the CPU only: Apple GPUs (Metal) have no float64 arithmetic. "
                            "It is the proof mode in which both backends agree to 1e-9; train with float32 here.")


_CPU_STREAMS: list[mx.Stream] = []


def _numpy(x: mx.array) -> np.ndarray:
    """A copy as numpy, bfloat16 (which numpy lacks) as float32: exact, and any backend reads it."""
    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def update_streams(sizes: dict[str, int]) -> dict[str, mx.Stream | None]:
    """A stream for each trainable array's optimizer update: on the CPU, one stream per core with the
    arrays dealt out by size (largest first, to the least loaded), as MLX runs each CPU stream on
    its own thread and an element-wise op on one. Every element's update is the same operations
    on any stream, so the same bits. Full fine-tuning's update at 58M values: 0.40 s on 2 streams
    against 0.94 s on one (benchmarks/README.md). A GPU stream already runs in parallel: None."""
    if mx.default_device() != mx.cpu:
        return dict.fromkeys(sizes)
    while len(_CPU_STREAMS) < min(os.cpu_count() or 1, 8):  # made once per process: each is a thread
        _CPU_STREAMS.append(mx.new_stream(mx.cpu))
    streams = _CPU_STREAMS[:max(len(sizes), 1)]
    load = [0] * len(streams)
    chosen = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        least = load.index(min(load))
        load[least] += sizes[name]
        chosen[name] = streams[least]
    return chosen


class WeightsAsNumpy(Mapping):
    """A model's arrays as a read-only mapping of numpy float32 arrays, each converted when read."""

    def __init__(self, arrays: dict[str, mx.array]):
        self.arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return np.array(self.arrays[name].astype(mx.float32))

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)


@mx.custom_function
def log_sigmoid(x: mx.array) -> mx.array:
    """log(1 / (1 + e^-x)) through `exp` (accurate in float64, where mx.exp is float32's), its gradient
    sigmoid(-x) given outright: no branch point at 0 for autograd to split."""
    return -(mx.maximum(-x, 0) + mx.log1p(exp(-mx.abs(x))))


@log_sigmoid.vjp
def _log_sigmoid_vjp(x, cotangent, output):
    return cotangent * exp(log_sigmoid(-x))


class MLXOps:
    """tasks/objectives.py's Ops on MLX arrays of one dtype."""

    def __init__(self, dtype: mx.Dtype):
        self.dtype = dtype

    def array(self, values: np.ndarray) -> mx.array:
        return mx.array(values, dtype=self.dtype)

    exp, expm1, log, log1p = staticmethod(exp), staticmethod(mx.expm1), staticmethod(mx.log), staticmethod(mx.log1p)
    where, log_sigmoid = staticmethod(mx.where), log_sigmoid
    minimum, maximum, clip = staticmethod(mx.minimum), staticmethod(mx.maximum), staticmethod(mx.clip)

    @staticmethod
    def relu(x: mx.array) -> mx.array:
        return mx.maximum(x, 0)

    @staticmethod
    def stop_gradient(x: mx.array) -> mx.array:
        return mx.stop_gradient(x)


class MLXBackend:
    name = "mlx"
    capabilities = CAPABILITIES["mlx"]
    sharded = False  # every process keeps the whole model (train.fsdp is torch's FSDP2)

    def __init__(self, spec: GPTNeoSpec, weights: dict[str, np.ndarray],
                 quantized: dict[str, NF4Tensor] | None = None, dtype: str = "float32"):
        _check_dtype(dtype)
        self.spec = spec
        self.model = GPTNeoForCausalLM(spec)
        compute = DTYPES[dtype]
        self.precise = DTYPES[trainable_dtype(dtype)]
        loaded = [(k, mx.array(v).astype(compute)) for k, v in weights.items()]
        for name, weight in (quantized or {}).items():
            bias = weights.get(f"{name}.bias")
            layer = NF4Linear(weight, None if bias is None else mx.array(bias).astype(compute))
            set_submodule(self.model, name, layer)
            loaded += [(f"{name}.{k}", v) for k, v in tree_flatten(layer.parameters()) if k != "bias"]
        self.model.load_weights(loaded, strict=True)
        self.model.freeze()
        self.model.eval()
        mx.eval(self.model.parameters())
        self._start()

    @classmethod
    def from_model(cls, model: nn.Module, dtype: str = "float32") -> "MLXBackend":
        """Train a model built elsewhere, e.g. an mlx-lm model wrapped in MLXLMModel (MLX only).

        Example:
            >>> from mlx_lm.models import llama
            >>> from twintune.backends.mlx.mlx_lm_model import MLXLMModel
            >>> args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            ...                        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=1000)
            >>> backend = MLXBackend.from_model(MLXLMModel(llama.Model(args)))
            >>> from twintune.methods import LoRA
            >>> backend.apply_method(LoRA(r=8).plan(BaseModel(backend.spec, backend.base_weights()), seed=0))
            >>> len(backend.trainable_state())   # A and B of q_proj and v_proj in 2 blocks
            8
        """
        from twintune.backends.mlx.mlx_lm_model import MLXLMSpec

        if dtype == "float64":
            raise TwintuneError("dtype float64 is the GPT-Neo proof mode (both backends agree to 1e-9); "
                                "mlx-lm models train in float32, bfloat16 or float16.")
        backend = cls.__new__(cls)
        backend.model = model
        backend.spec = MLXLMSpec.of(model)
        backend.precise = mx.float32
        model.set_dtype(DTYPES[dtype])
        model.freeze()
        model.eval()
        mx.eval(model.parameters())
        backend._start()
        return backend

    @classmethod
    def from_mlx_lm(cls, directory, dtype: str = "float32") -> "MLXBackend":
        """A model directory of one of mlx-lm's families (config.json + safetensors), ready to adapt."""
        from twintune.backends.mlx.mlx_lm_model import load_mlx_lm_model

        return cls.from_model(load_mlx_lm_model(directory), dtype=dtype)

    def _start(self) -> None:
        self.grads = None
        self.lr_scales = {}
        self.step = 0
        self._loss_and_grad = nn.value_and_grad(self.model, self._loss)
        self._distill_and_grad = nn.value_and_grad(self.model, self._distill_loss)
        self._objective_and_grad = nn.value_and_grad(self.model, self._objective_loss)

    def quantize_affine(self, bits: int, group_size: int) -> None:
        """MLX's own affine quantization of every block linear layer (fast on Macs; MLX only)."""
        for name in self.spec.linear_layers():
            set_submodule(self.model, name, nn.QuantizedLinear.from_linear(
                get_submodule(self.model, name), group_size=group_size, bits=bits))
        self.model.freeze()
        mx.eval(self.model.parameters())

    def apply_method(self, plan: Plan) -> None:
        apply_plan(self.model, plan, np.float64 if self.precise == mx.float64 else np.float32)
        self.lr_scales = dict(plan.lr_scales)

    def undo_method(self, plan: Plan, base: BaseModel) -> None:
        """Take an applied plan off the model again (switching adapters on one loaded base)."""
        undo_plan(self.model, plan, base)
        self.lr_scales = {}

    def base_weights(self) -> "WeightsAsNumpy":
        """The model's weights by name, as float32 numpy when read (for planning on a model built elsewhere).

        Example:
            >>> from mlx_lm.models import llama
            >>> from twintune.backends.mlx.mlx_lm_model import MLXLMModel
            >>> args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            ...                        num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=1000)
            >>> backend = MLXBackend.from_model(MLXLMModel(llama.Model(args)))
            >>> backend.base_weights()["model.embed_tokens.weight"].shape
            (1000, 64)
        """
        return WeightsAsNumpy(dict(tree_flatten(self.model.parameters())))

    def enable_gradient_checkpointing(self) -> None:
        if not hasattr(self.model, "transformer"):
            raise TwintuneError("train.gradient_checkpointing is built for GPT-Neo; this mlx-lm model runs without it.")
        self.model.transformer.checkpoint_blocks = True

    def enable_compile(self) -> None:
        # The model's arrays (trainable ones change every step) are the compiled function's inputs, as
        # in mlx-lm's trainer; the dropout key is an argument, so masks change without recompiling.
        state = [self.model.state]
        self._loss_and_grad = mx.compile(self._loss_and_grad, inputs=state, outputs=state)

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {k: _numpy(v) for k, v in tree_flatten(self.model.trainable_parameters())}

    def set_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        dtypes = {k: v.dtype for k, v in tree_flatten(self.model.trainable_parameters())}
        self.model.update(tree_unflatten([(k, mx.array(v, dtype=dtypes[k])) for k, v in state.items()]))

    has_cuda = False  # paged optimizers are CUDA's (MLX's memory is unified already)

    def set_optimizer(self, optimizer: Optimizer, weight_decay: float = 0.0) -> None:
        self.optimizer, self.weight_decay = optimizer, weight_decay
        params = dict(tree_flatten(self.model.trainable_parameters()))
        self.states = {k: new_state(optimizer, v) for k, v in params.items()}
        self.array_ops = MLXArrayOps()
        self.streams = update_streams({k: v.size for k, v in params.items()})

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return pack_state({name: {key: _numpy(value) for key, value in state.items()}
                           for name, state in self.states.items()}, self.step)

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        params = dict(tree_flatten(self.model.trainable_parameters()))
        saved, self.step = unpack_state(self.optimizer, state, {k: tuple(v.shape) for k, v in params.items()},
                                        {k for k, v in params.items() if low_precision(v)})
        self.states = {name: {key: mx.array(value, dtype=self.states[name][key].dtype) for key, value in arrays.items()}
                       for name, arrays in saved.items()}

    def _hidden_rows(self, input_ids: mx.array, prompt_lengths: mx.array, rows: mx.array,
                     shared: dict | None = None) -> mx.array:
        return self.model(input_ids, prompt_lengths, rows=rows, **(shared or {}))

    @staticmethod
    def _shared(batch: Batch) -> dict | None:
        """The positions and segments of rows that share a prompt (Batch.segments), as the model takes them."""
        if batch.segments is None:
            return None
        return {"positions": mx.array(batch.positions), "segments": mx.array(batch.segments)}

    @staticmethod
    def _dropout(batch: Batch, dropout_key: int) -> mx.array:
        """The micro-batch's key and this batch's place in it (twintune/dropout.py), one uint32 array:
        an input of the (compiled) step, not a constant of it."""
        return mx.array([dropout_key, batch.first_row, batch.width_pad], dtype=mx.uint32)

    def _loss(self, input_ids, prompt_lengths, positions, targets, scale, dropout):
        with dropout_masks(dropout[0], dropout[1], dropout[2]):
            loss = self._summed_cross_entropy(self._hidden_rows(input_ids, prompt_lengths, positions), targets)
        return loss * scale, loss

    def _summed_cross_entropy(self, hidden: mx.array, targets: mx.array) -> mx.array:
        """The cross-entropy of the output layer's logits at these rows, summed. Vocabulary logits of
        many rows go in chunks (loss_chunks), each checkpointed: the backward recomputes one chunk's
        logits at a time instead of keeping (rows x vocabulary) of them. The output layer's trainable
        values (full fine-tuning's tied embedding) enter each chunk as arguments, for their gradients."""
        def summed(h, t):
            logits = self.model.logits(h).astype(self.precise)
            return (logsumexp(logits)[:, 0] - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]).sum()

        chunks = loss_chunks(hidden.shape[0], self.spec.vocab_size if self.model.score is None else 0)
        if len(chunks) == 1:
            return summed(hidden, targets)
        layer = self.model.output_layer()

        def chunk(start: int, stop: int) -> mx.array:
            def run(parameters, h):  # the targets stay outside: indices have no gradient
                layer.update(parameters)
                return summed(h, targets[start:stop])
            return mx.checkpoint(run)(layer.trainable_parameters(), hidden[start:stop])

        return sum(chunk(start, stop) for start, stop in chunks)

    def forward_backward(self, batch: Batch, loss_scale: float, dropout_key: int = 0) -> float:
        self.model.train()
        (_, loss), grads = self._loss_and_grad(
            mx.array(batch.input_ids), mx.array(batch.prompt_lengths), mx.array(batch.target_positions), mx.array(batch.targets),
            mx.array(loss_scale, dtype=self.precise), self._dropout(batch, dropout_key))
        self.grads = grads if self.grads is None else tree_map(mx.add, self.grads, grads)
        mx.eval(loss, self.grads)
        return loss.item()

    def _target_values(self, ids: mx.array, lengths: mx.array, positions: mx.array, targets: mx.array,
                       reads: str, temperature: float = 1.0, shared: dict | None = None) -> mx.array:
        """(N,) at the batch's targets: the target token's log-probability (of softmax(logits /
        temperature)), or a one-output head's score; "logps_values": (N, 2), the log-probability and
        the value head's estimate (PPO). Vocabulary logits go in chunks, as _summed_cross_entropy takes them."""
        hidden = self._hidden_rows(ids, lengths, positions, shared)
        if reads == "scores":
            return self.model.logits(hidden).astype(self.precise)[:, 0]

        def logps(h, t):
            logits = self.model.logits(h).astype(self.precise)
            logits = logits if temperature == 1.0 else logits / temperature
            return mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - logsumexp(logits)[:, 0]

        chunks = loss_chunks(hidden.shape[0], self.spec.vocab_size if self.model.score is None else 0)
        if len(chunks) == 1:
            found = logps(hidden, targets)
        else:
            layer = self.model.output_layer()

            def chunk(start: int, stop: int) -> mx.array:
                def run(parameters, h):
                    layer.update(parameters)
                    return logps(h, targets[start:stop])
                return mx.checkpoint(run)(layer.trainable_parameters(), hidden[start:stop])

            found = mx.concatenate([chunk(start, stop) for start, stop in chunks])
        if reads == "logps_values":
            return mx.stack([found, self.model.v_head(hidden).astype(self.precise)[:, 0]], axis=1)
        return found

    def _batch_arrays(self, batch: Batch) -> tuple[mx.array, ...]:
        return (mx.array(batch.input_ids), mx.array(batch.prompt_lengths), mx.array(batch.target_positions),
                mx.array(batch.targets))

    def target_values(self, batch: Batch, reads: str, reference: bool = False, temperature: float = 1.0) -> np.ndarray:
        self.model.eval()
        with base_view(self.model, *self.view) if reference else contextlib.nullcontext():
            values = self._target_values(*self._batch_arrays(batch), reads, temperature, self._shared(batch))
            mx.eval(values)
        return np.array(values)

    def _objective_loss(self, ids, lengths, positions, targets, scale, dropout, objective, batch):
        with dropout_masks(dropout[0], dropout[1], dropout[2]):
            values = self._target_values(ids, lengths, positions, targets, objective.reads, objective.temperature,
                                         self._shared(batch))
        loss, figures = objective.loss(MLXOps(self.precise), values, batch)
        return loss * scale, (loss, figures)

    def objective_backward(self, batch: Batch, objective, loss_scale: float, dropout_key: int = 0) -> np.ndarray:
        self.model.train()
        (_, (loss, figures)), grads = self._objective_and_grad(
            *self._batch_arrays(batch), mx.array(loss_scale, dtype=self.precise), self._dropout(batch, dropout_key),
            objective, batch)
        self.grads = grads if self.grads is None else tree_map(mx.add, self.grads, grads)
        mx.eval(loss, figures, self.grads)
        return np.array([loss.item(), *(f.item() for f in figures)], np.float64)

    def optimizer_step(self, lr: float, max_grad_norm: float, grad_scale: float = 1.0) -> float:
        grads = dict(tree_flatten(self.grads))
        self.grads = None
        squares = []
        for name, g in grads.items():
            with mx.stream(self.streams[name] or mx.default_stream(mx.default_device())):
                # by rows, then the rows: mx.sum of a whole large float32 array drifts (58M squares of
                # normal values summed to 48.5M), and this is faster than a dot product of copies
                g = g.astype(mx.float32) if g.dtype == mx.bfloat16 else g  # a bfloat16 value's, summed in float32
                squares.append(mx.sum(mx.sum(g * g, axis=-1)))
        norm, factor = gradient_factor(mx.sqrt(sum(squares)).item(), max_grad_norm, grad_scale)
        if factor is None:
            return norm
        self.step += 1
        updated = []
        for name, p in tree_flatten(self.model.trainable_parameters()):
            with mx.stream(self.streams[name] or mx.default_stream(mx.default_device())):
                g = grads.pop(name)
                g = g * factor if factor != 1.0 else g
                p, self.states[name] = update_value(self.optimizer, self.array_ops, p, g, self.states[name], self.step,
                                                    lr * self.lr_scales.get(name, 1.0), self.weight_decay)
            updated.append((name, p))
        # The model and these names let go of the old values before the update runs, so MLX can write
        # the new ones into their buffers instead of allocating a second copy of every trainable array.
        p = g = None
        self.model.update(tree_unflatten(updated))
        updated = None
        mx.eval(self.model.trainable_parameters(), self.states)
        return norm

    def join(self, world) -> None:
        # strict: a launch without the launcher is an error here, not a silent group of one
        try:
            self.group = mx.distributed.init(strict=True, backend="ring")
        except RuntimeError as error:
            raise TwintuneError(f"mlx.launch announced process {world.rank} of {world.size}, but MLX's ring group "
                                f"could not start ({str(error).splitlines()[0]}).") from None
        if self.group.size() != world.size or self.group.rank() != world.rank:
            raise TwintuneError(f"mlx.launch announced process {world.rank} of {world.size}, but the ring group "
                                f"holds {self.group.size()}.")

    def whole_model(self) -> contextlib.AbstractContextManager:
        """Evaluation needs the whole model on every process: it has it (never sharded)."""
        return contextlib.nullcontext()

    def sum_gradients(self) -> None:
        """One all_sum of every gradient, flattened into one array (one message round per step)."""
        if self.grads is None:  # no rows of this step were this process's
            self.grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        names, grads = zip(*tree_flatten(self.grads))
        flat = mx.distributed.all_sum(mx.concatenate([g.reshape(-1) for g in grads]), group=self.group)
        sizes = np.cumsum([g.size for g in grads])[:-1].tolist()
        summed = [part.reshape(g.shape) for part, g in zip(mx.split(flat, sizes), grads)]
        self.grads = tree_unflatten(list(zip(names, summed)))
        mx.eval(self.grads)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        # dtype given: mx.array makes float32 of a float64 numpy array by default
        summed = mx.distributed.all_sum(mx.array(np.asarray(values), dtype=mx.float64), group=self.group)
        return np.array(summed, np.float64)

    def leave(self) -> None:
        """Every process waits for the last (a sum over the ring); MLX's group needs no closing."""
        self.all_sum(np.zeros(1))

    def set_base_view(self, plan: Plan, start: dict[str, np.ndarray]) -> None:
        """What distill_backward's teacher switches off: the plan's surgeries, and the start's values of
        the parameters it unfroze (a frozen copy of those: full fine-tuning's cost of distillation)."""
        unfrozen = set(plan.unfrozen())
        params = dict(tree_flatten(self.model.parameters()))
        self.view = (plan, {k: mx.array(v, dtype=params[k].dtype) for k, v in start.items() if k in unfrozen})

    def _distill_loss(self, ids, lengths, positions, teacher, temperature, scale, dropout):
        with dropout_masks(dropout[0], dropout[1], dropout[2]):
            logits = self.model.logits(self._hidden_rows(ids, lengths, positions)).astype(self.precise) / temperature
        student = logits - logsumexp(logits)
        divergence = (exp(teacher) * (teacher - student)).sum() * temperature**2
        return divergence * scale, divergence

    def distill_backward(self, batch: Batch, temperature: float, scale: float, dropout_key: int = 0) -> float:
        """Backward of scale * T^2 * sum over the batch's targets of KL(base || model) at temperature T,
        the base being this model with the method off (set_base_view); returns the sum."""
        ids, lengths, positions = mx.array(batch.input_ids), mx.array(batch.prompt_lengths), mx.array(batch.target_positions)
        self.model.eval()
        with base_view(self.model, *self.view):
            logits = self.model.logits(self._hidden_rows(ids, lengths, positions)).astype(self.precise) / temperature
            teacher = logits - logsumexp(logits)
            mx.eval(teacher)
        self.model.train()
        (_, divergence), grads = self._distill_and_grad(ids, lengths, positions, teacher, temperature,
                                                        mx.array(scale, dtype=self.precise),
                                                        self._dropout(batch, dropout_key))
        self.grads = grads if self.grads is None else tree_map(mx.add, self.grads, grads)
        mx.eval(divergence, self.grads)
        return divergence.item()

    def take_gradients(self) -> dict[str, np.ndarray]:
        """The gradients accumulated since the last step, by name, then cleared."""
        taken = {k: _numpy(g) for k, g in tree_flatten(self.grads)}
        self.grads = None
        return taken

    def set_penalty(self, fisher: dict[str, np.ndarray], anchor: dict[str, np.ndarray], weight: float) -> None:
        """EWC's weight * sum(F * (value - anchor)^2) over the trainable values (train/guards.py)."""
        self.penalty_terms = {k: (mx.array(fisher[k], dtype=self.precise), mx.array(anchor[k], dtype=self.precise))
                              for k in fisher}
        self.penalty_weight = weight

    def penalty(self) -> float:
        params = dict(tree_flatten(self.model.trainable_parameters()))
        return ewc_penalty(self.penalty_weight, ((params[k], f, a) for k, (f, a) in self.penalty_terms.items()),
                           lambda x: x.item())

    def add_penalty_gradients(self, grad_scale: float = 1.0) -> None:
        """Add the penalty's gradient (ewc_gradient), times the loss scale, to the gradients."""
        params = dict(tree_flatten(self.model.trainable_parameters()))
        grads = dict(tree_flatten(self.grads)) if self.grads is not None else {}
        for name, (fisher, anchor) in self.penalty_terms.items():
            extra = ewc_gradient(params[name], fisher, anchor, self.penalty_weight, grad_scale)
            # in float32, rounded once to a bfloat16 value's own dtype (its gradient's)
            grads[name] = (extra if name not in grads else grads[name] + extra).astype(params[name].dtype)
        self.grads = tree_unflatten(list(grads.items()))
        mx.eval(self.grads)

    def target_loss(self, batch: Batch) -> float:
        self.model.eval()
        _, loss = self._loss(mx.array(batch.input_ids), mx.array(batch.prompt_lengths), mx.array(batch.target_positions),
                             mx.array(batch.targets), 1.0, self._dropout(batch, 0))
        return loss.item()

    def label_logprobs(self, batch: Batch, label_token_ids: np.ndarray) -> np.ndarray:
        self.model.eval()
        logits = self.model.logits(self._hidden_rows(mx.array(batch.input_ids), mx.array(batch.prompt_lengths),
                                                   mx.array(batch.answer_positions)))
        logits = logits.astype(self.precise)
        logprobs = logits - logsumexp(logits)
        return np.array(logprobs[:, mx.array(label_token_ids)])

    def features(self, batch: Batch, pooling: str, layer: int | None = None) -> np.ndarray:
        self.model.eval()
        hidden = self.model(mx.array(batch.input_ids), mx.array(batch.prompt_lengths), layer).astype(self.precise)
        weights = mx.array(batch.pooling_weights(pooling), dtype=self.precise)
        return np.array(mx.einsum("bt,btd->bd", weights, hidden))

    def logits(self, input_ids: np.ndarray, prompt_lengths: np.ndarray | None = None) -> np.ndarray:
        self.model.eval()
        lengths = None if prompt_lengths is None else mx.array(prompt_lengths)
        return np.array(self.model.logits(self.model(mx.array(input_ids), lengths)).astype(self.precise))

    def make_cache(self) -> list:
        """An empty key/value cache for next_token_logits."""
        return self.model.make_cache()

    def greedy_tokens(self, prompt_ids: list[int], cache: list, count: int) -> Iterator[int]:
        """Up to `count` greedy tokens after the prompt, each forward pass queued (mx.async_eval) before the
        token before it is handed back, as mlx-lm's generate_step: Python's work overlaps the computation.
        The first highest score, as numpy's argmax in twintune.generation.choose_token."""
        self.model.eval()

        def best_after(ids: mx.array) -> mx.array:
            return mx.argmax(self.model.logits(self.model(ids, cache=cache)[0, -1]).astype(self.precise))

        token = best_after(mx.array([prompt_ids], dtype=mx.int32))
        mx.async_eval(token)
        for i in range(count):
            following = best_after(token.reshape(1, 1).astype(mx.int32)) if i + 1 < count else None
            if following is not None:
                mx.async_eval(following)
            yield int(token.item())
            token = following

    def next_token_logits(self, input_ids: np.ndarray, cache: list) -> np.ndarray:
        """The vocabulary scores (rows, vocabulary) after the last of each row of `input_ids` (rows,
        tokens), which continue the positions `cache` holds and are added to it."""
        self.model.eval()
        hidden = self.model(mx.array(input_ids), cache=cache)
        return np.array(self.model.logits(hidden[:, -1]).astype(self.precise))

    def framework_peak_mb(self) -> float | None:
        """MLX's allocator peak: the arrays' memory, unified (what Metal or the CPU held at most)."""
        return mx.get_peak_memory() / 2**20

    def set_memory_limit(self, limit_bytes: int) -> None:
        # MLX holds off allocating past the memory limit while work in flight can free some; the wired
        # limit keeps Metal from pinning more than that (on Apple silicon: before the machine swaps)
        mx.set_memory_limit(limit_bytes)
        if mx.metal.is_available():
            mx.set_wired_limit(min(limit_bytes, mx.metal.device_info()["max_recommended_working_set_size"]))
