"""How much memory a recipe's training takes, before running it: weights, trainable state, activations.

The model is counted tensor by tensor from its spec; the activations are the tensors the backward
pass keeps for each block (the same on both backends: layer-norm inputs, q/k/v and the attention
output for the fused attention, the MLP's pre-activation, and each adapter's inputs), plus the
gradients in flight through one block. Figures are for the model and training alone: the
framework itself (torch's libraries, about 0.4 GB of process memory on a CPU) comes on top.
benchmarks/memory_estimate.py checks the estimate against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from twintune.methods import BaseModel, Method
from twintune.methods.base import block_index
from twintune.tasks import HEAD
from twintune.tasks.ppo import VALUE_HEAD
from twintune.models import GPTNeoSpec
from twintune.optimizers import AdamW, Optimizer
from twintune.quant import Quantization

FLOAT32 = 4
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
ATTENTION_KEPT = 4.0  # q, k, v and the attention output per block, in units of d: float32 in every dtype
# Arrays the backward keeps per block and per token, in units of (hidden size d, MLP width f,
# heads x sequence length), and the short-lived ones at the peak (per token, once).
# torch: counted from the saved tensors (layer-norm inputs, q, k, v and the attention output of
# the fused attention, the MLP pre-activation; gradients through one block).
# MLX: fitted on tiny models (d 128-256, f 512-2048, 4-8 blocks; its CPU attention keeps the
# attention probabilities, and its lazy graph holds more d-sized arrays until the backward runs);
# benchmarks/memory_estimate.py checks both on the 125M shape, which the fit did not see.
KEPT_PER_BLOCK = {"torch": (6.0, 1.0, 0.0), "mlx": (3.9, 1.5, 1.0)}
TRANSIENT = {"torch": (4.0, 3.0, 0.0), "mlx": (30.0, 2.1, 2.0)}
VALUE_AND_GRADIENT = 2  # per trainable value, in its dtype; the optimizer's state comes on top (Optimizer.state_bytes)


@dataclass(frozen=True)
class MemoryEstimate:
    frozen_weights: int  # bytes: float weights plus quantized layers as stored
    trainable: int  # parameters, gradients and optimizer state
    activations: int  # kept for the backward pass, all blocks
    transient: int  # the largest short-lived tensors at the peak (one block's gradients, a dequantized weight)
    loading: int  # while the checkpoint is read: every float32 weight at once, before quantizing
    trainable_parameters: int
    tokens: int
    guards: int = 0  # EWC's Fisher and start values; the base view's (distillation, a preference reference) start values of unfrozen parameters
    scorers: int = 0  # a reward run's model, opened beside this one to score completions (GRPO, PPO)
    rollouts: int = 0  # PPO's rollout: its rows' tokens and five float64 numbers per completion token

    @property
    def training_peak(self) -> int:
        return (self.frozen_weights + self.trainable + self.activations + self.transient + self.guards + self.scorers
                + self.rollouts)

    def rows(self) -> list[tuple[str, float]]:
        mb = 2**20
        guards = [("guards (EWC's Fisher and start; the base view's frozen copy)", self.guards / mb)] if self.guards else []
        scorers = [("reward model (frozen)", self.scorers / mb)] if self.scorers else []
        rollouts = [("PPO rollout", self.rollouts / mb)] if self.rollouts else []
        return [("frozen weights", self.frozen_weights / mb), ("trainable + optimizer", self.trainable / mb),
                ("activations", self.activations / mb), ("transient", self.transient / mb), *guards, *scorers, *rollouts,
                ("training peak", self.training_peak / mb), ("loading peak", self.loading / mb)]


def estimate_memory(spec: GPTNeoSpec, method: Method, quantization: Quantization | None, batch_size: int,
                    sequence_length: int, backend: str = "torch", optimizer: Optimizer | None = None,
                    gradient_checkpointing: bool = False, dtype: str = "float32", head_labels: int = 0,
                    ewc: bool = False, distill: bool = False, value_head: bool = False, reward_model: bool = False,
                    rollout_rows: int = 0) -> MemoryEstimate:
    """Estimated bytes of one training step of `method` on `spec`, for batches of batch_size x sequence_length.

    `dtype` is the frozen model's (the recipe's `dtype`): its weights and most activations take
    that many bytes; the attention, the adapters' inputs and what a method adds stay float32
    (float64 in a float64 run); the base parameters a method unfreezes train in `dtype` (bfloat16:
    with a 2-byte compensation each, optimizers.compensated_update). `head_labels` > 0: a linear classification head of that many labels
    trains too (task head linear). `ewc`: the Fisher diagonal and start values of every trainable
    value; `distill`: the start values of the parameters the method unfreezes, which the teacher (the
    model with the method off) reads — for full fine-tuning a frozen copy of the model. `optimizer`
    (default AdamW) keeps its state per trainable value (twintune/optimizers.py: 8 bytes for AdamW,
    ~2 for adamw8bit, the rows and columns of a matrix for Adafactor).

    Example:
        >>> from twintune.formats.checkpoint import load_checkpoint
        >>> from twintune.methods import LoRA
        >>> spec = GPTNeoSpec.from_config(load_checkpoint("builtin:tiny-gpt-neo").config)
        >>> estimate = estimate_memory(spec, LoRA(r=8), None, batch_size=16, sequence_length=64, backend="mlx")
        >>> estimate.training_peak > estimate.frozen_weights   # bytes: activations dominate a tiny model
        True
    """
    d, f, layers = spec.hidden_size, spec.intermediate_size, spec.num_layers
    linear = spec.linear_layers()
    trainable_shapes = method.shapes(BaseModel(spec, {}, quantization=quantization, dtype=dtype))
    if head_labels:
        trainable_shapes = {**trainable_shapes, HEAD: (head_labels, spec.hidden_size)}
    if value_head:
        trainable_shapes = {**trainable_shapes, **dict(zip(VALUE_HEAD, ((1, spec.hidden_size), (1,))))}

    shapes = spec.weight_shapes()
    float_weights = sum(_size(shape) for name, shape in shapes.items()
                        if not (quantization and name.endswith(".weight") and name[:-len(".weight")] in linear))
    e = BYTES[dtype]
    precise = max(e, FLOAT32)  # attention, adapter inputs, trainable values: float32, or float64 in float64
    frozen = float_weights * e
    if quantization:
        frozen += sum(quantized_bytes(out_f * in_f, quantization, e) for out_f, in_f in linear.values())

    trainable_parameters = sum(_size(shape) for shape in trainable_shapes.values())
    as_built = frozen  # the whole model as the backend builds it, before any parameter is unfrozen
    # Frozen tensors the method adds (shared random projections), held once in the adapters' dtype
    frozen += sum(value.size for value in method.frozen_values(spec).values()) * precise
    frozen -= sum(_size(shape) for name, shape in trainable_shapes.items() if name in shapes) * e  # unfrozen: counted as trainable
    optimizer = optimizer or AdamW()
    # An unfrozen base parameter trains in the model's dtype (bfloat16: with a compensation beside
    # it); what a method adds trains in the precise dtype.
    value_bytes = {name: e if name in shapes else precise for name in trainable_shapes}
    trainable = sum(_size(shape) * VALUE_AND_GRADIENT * value_bytes[name]
                    + optimizer.state_bytes(tuple(shape), precise, value_bytes[name])
                    for name, shape in trainable_shapes.items())

    # Virtual tokens: a prompt's pass through every block like the text's; a prefix's are extra keys only.
    keys_length = sequence_length + method.virtual_tokens
    through_blocks = any(name.startswith("transformer.prompt.") for name in trainable_shapes)
    tokens = batch_size * (keys_length if through_blocks else sequence_length)
    heads_by_length = spec.num_heads * keys_length
    kd, kf, ka = KEPT_PER_BLOCK[backend]
    # bytes per token and block: the attention's share of kd is float32, the rest in the dtype
    attention = min(kd, ATTENTION_KEPT) * d
    per_token_per_block = attention * precise + ((kd * d - attention) + kf * f) * e + ka * heads_by_length * precise
    # The backward runs only down to the lowest block that trains: blocks below keep nothing for it.
    blocks = layers - first_trained_block(trainable_shapes, layers)
    per_token_per_block += kept_for_trainables(method, trainable_shapes, linear, d, f, max(blocks, 1)) * precise
    td, tf, ta = TRANSIENT[backend]
    transient = int(tokens * ((td * d + tf * f) * e + ta * heads_by_length * precise))
    if gradient_checkpointing:  # each block's input is kept; one block at a time is recomputed
        activations = int(tokens * (blocks * d + 3 * d) * e)
        transient += int(tokens * per_token_per_block)
    else:
        activations = int(tokens * (blocks * per_token_per_block + 3 * d * e))  # + embeddings, final norm
    if quantization and quantization.type == "nf4":
        transient += 2 * max(out_f * in_f for out_f, in_f in linear.values()) * e  # dequantized, fwd + bwd
    converted = as_built - float_weights * FLOAT32 if e == FLOAT32 else as_built  # float32 weights are used as read
    loading = sum(_size(shape) for shape in shapes.values()) * FLOAT32 + converted
    guards = 2 * trainable_parameters * precise if ewc else 0
    if distill:
        guards += sum(_size(shape) for name, shape in trainable_shapes.items() if name in shapes) * precise
    scorers = as_built if reward_model else 0
    rollouts = rollout_rows * sequence_length * (8 + 5 * 8)  # ids (int64 in a checkpoint); old, ref, V, A, R
    return MemoryEstimate(frozen, trainable, activations, transient, loading, trainable_parameters, tokens, guards,
                          scorers, rollouts)


# Which input each linear layer reads (q, k and v read the same ln_1 output: kept once).
_INPUTS = {"q_proj": "ln_1", "k_proj": "ln_1", "v_proj": "ln_1", "out_proj": "attention", "c_fc": "ln_2", "c_proj": "mlp"}


def kept_for_trainables(method: Method, shapes: dict[str, tuple[int, ...]], linear: dict[str, tuple[int, int]],
                        d: int, f: int, layers: int) -> float:
    """Values per token and block that the backward keeps for the trainable values, beyond the base's:
    the input of every layer the method's values read (each kept once: q, k and v share theirs), and
    what the method says it keeps besides (Method.kept_for_backward)."""
    inputs, extra = method.kept_for_backward(shapes, linear)
    sizes = {"ln_1": d, "attention": d, "ln_2": d, "mlp": f}
    return (sum(sizes[key] for key in {_INPUTS[layer.rsplit(".", 1)[-1]] for layer in inputs}) * layers + extra) / layers


def first_trained_block(shapes: dict[str, tuple[int, ...]], layers: int) -> int:
    """The lowest block the backward must reach: 0 if an embedding or virtual tokens train, `layers`
    if no block does."""
    if any(name.startswith(("transformer.wte.", "transformer.wpe.", "transformer.prompt.", "transformer.prefix."))
           for name in shapes):
        return 0
    found = [block_index(name) for name in shapes if block_index(name) is not None]
    return min(found) if found else layers


def quantized_bytes(n: int, quantization: Quantization, float_bytes: int = FLOAT32) -> int:
    """Bytes a quantized (out x in) weight of n values takes as stored (affine scales in the model's dtype)."""
    if quantization.type == "nf4":
        blocks = -(-n // quantization.blocksize)
        absmax = blocks + 4 * -(-blocks // 256) + 4 if quantization.double_quant else 4 * blocks
        return -(-n // 2) + absmax
    groups = -(-n // quantization.group_size)  # MLX affine: packed codes, a scale and a bias per group
    return n * quantization.bits // 8 + 2 * float_bytes * groups


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def estimate_recipe(path: str, overrides: list[str] = (), tokens: int | None = None,
                    backend: str | None = None) -> tuple[list[tuple[str, float]], str]:
    """The estimate's rows (name, MB) for a recipe file, and what was assumed: one line, and one more
    against the recipe's train.memory_limit_gb where it sets one.

    Reads only the model's config.json, never its weights.

    Example:
        >>> rows, note = estimate_recipe("recipes/demo-financial-sentiment.yaml", backend="torch")
        >>> [name for name, _ in rows][:2]
        ['frozen weights', 'trainable + optimizer']
    """
    from twintune.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    estimate, note = recipe_estimate(recipe, tokens, backend)
    rows = estimate.rows()
    limit = recipe.train.memory_limit_gb
    if limit:
        rows.append(("memory limit", limit * 1024))
        over = estimate.training_peak / 2**30 - limit
        note += (f"\nthe training peak is {-over:.2f} GB under train.memory_limit_gb ({limit:g} GB)" if over <= 0 else
                 f"\nthe training peak is {over:.2f} GB over train.memory_limit_gb ({limit:g} GB): the run would be "
                 "refused")
    return rows, note


def recipe_estimate(recipe, tokens: int | None = None, backend: str | None = None) -> tuple[MemoryEstimate, str]:
    """The estimate of a recipe's training step (GPT-Neo models: the estimator counts their arrays), and
    one line saying what was assumed. Reads only the model's config.json."""
    from twintune.backends import resolve_backend_name
    from twintune.errors import TwintuneError
    from twintune.formats.checkpoint import load_config

    config = load_config(recipe.model)
    if config.get("model_type") != "gpt_neo":
        raise TwintuneError(f"twintune estimate counts GPT-Neo models; this recipe's model is {config.get('model_type')!r}.")
    spec = GPTNeoSpec.from_config(config)
    length = tokens or min(recipe.data.max_length, spec.max_positions)
    if length < 1:
        raise TwintuneError(f"--tokens must be at least 1, not {length}.")
    backend = resolve_backend_name(recipe.backend if backend in (None, "auto") else backend)
    # A preference pair counts as two rows (GPT-Neo runs it as one row of its prompt and both answers: fewer tokens)
    rows = recipe.train.batch_size * recipe.task.rows_per_example
    objective = recipe.task.objective
    base_view = recipe.train.distill.weight > 0 or (objective is not None and objective.needs_reference)
    estimate = estimate_memory(spec, recipe.method_spec(), recipe.quantization(), rows, length,
                               backend, gradient_checkpointing=recipe.train.gradient_checkpointing, dtype=recipe.dtype,
                               head_labels=len(recipe.task.head_labels(recipe) or []),
                               ewc=recipe.train.ewc.weight > 0, distill=base_view,
                               value_head=recipe.task.learns_from_rollouts, reward_model=bool(recipe.task.reward_model),
                               rollout_rows=_rollout_rows(recipe), optimizer=recipe.train.optimizer)
    quant = recipe.quantize.type if recipe.quantize.type != "none" else recipe.dtype
    note = (f"{recipe.name}: GPT-Neo {spec.num_layers} layers x {spec.hidden_size}, {quant} base, method {recipe.method.name} "
            f"({estimate.trainable_parameters:,} trainable), {backend} backend, batch {rows} x {length} tokens, "
            f"optimizer {recipe.train.optimizer.name}; "
            "framework memory not included")
    return estimate, note


def check_memory_limit(recipe, backend: str) -> None:
    """Refuse a run whose estimated training peak is above train.memory_limit_gb, by a sentence with
    the estimate (before the model loads). A model the estimator cannot count (an mlx-lm family) is
    held to the limit by its framework's allocator only.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> check_memory_limit(load_recipe("recipes/demo-financial-sentiment.yaml", ["train.memory_limit_gb=4"]), "torch")
    """
    from twintune.errors import TwintuneError
    from twintune.formats.checkpoint import load_config

    limit = recipe.train.memory_limit_gb
    if not limit or load_config(recipe.model).get("model_type") != "gpt_neo":
        return
    estimate, _ = recipe_estimate(recipe, backend=backend)
    peak = estimate.training_peak / 2**30
    if peak > limit:
        raise TwintuneError(f"this run's training peak is estimated at {peak:.2f} GB, above train.memory_limit_gb "
                            f"({limit:g} GB): lower train.batch_size or data.max_length, set "
                            "train.gradient_checkpointing, quantize the base, or raise the limit (twintune estimate "
                            "shows where the memory goes).")


def _rollout_rows(recipe) -> int:
    """The rows of a PPO rollout (none for other tasks): a completion of each of num_mini_batches steps' prompts."""
    if not recipe.task.learns_from_rollouts:
        return 0
    return recipe.train.batch_size * recipe.train.grad_accum * recipe.task.num_mini_batches
