"""GPT-Neo in MLX, one file, top to bottom (in the style of mlx-lm's models).

What makes GPT-Neo GPT-Neo: learned positions; blocks alternating global and local
(sliding-window) causal attention; attention scores NOT scaled by 1/sqrt(head_dim); q/k/v
without bias, out_proj with bias; gelu_new; lm_head tied to the token embedding.
Module names follow Hugging Face's so weights load by name.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from twintune.dropout import current_dropout_scope, dropout_rows, dropout_scope
from twintune.models import GPTNeoSpec


_GELU_C = math.sqrt(2.0 / math.pi)


@partial(mx.compile, shapeless=True)
def _gelu_new_forward(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.tanh(_GELU_C * (x + 0.044715 * x**3)))


@partial(mx.compile, shapeless=True)
def _gelu_new_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    t = mx.tanh(_GELU_C * (x + 0.044715 * x**3))
    return cotangent * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x))


@mx.custom_function
def gelu_new(x: mx.array) -> mx.array:
    """GPT-Neo's tanh GELU. Its backward recomputes from x alone: differentiating the formula kept
    more (tokens, 4d) arrays per block until the backward pass (measured, short-lived ones
    included: 4.5 per block and token before, 2.5 after)."""
    return _gelu_new_forward(x)


@gelu_new.vjp
def _gelu_new_vjp(primals, cotangent, output):
    return _gelu_new_backward(primals, cotangent)


# float64 (CPU, the parity proof): MLX's exp, logsumexp, softmax, layer_norm and fused attention
# compute at float32 accuracy even on float64 arrays (measured: exp 3e-6 relative, layer_norm 6e-7),
# while its power, tanh, matmul and reductions are float64-exact. So float64 composes these few
# from the exact ops; every other dtype keeps MLX's fast kernels.


def exp(x: mx.array) -> mx.array:
    """e**x; in float64 through mx.power, exact to ~3e-15."""
    if x.dtype != mx.float64:
        return mx.exp(x)
    return mx.power(mx.array(math.e, dtype=mx.float64), x)


def logsumexp(x: mx.array) -> mx.array:
    """log(sum(exp(x))) over the last axis, keeping it."""
    if x.dtype != mx.float64:
        return mx.logsumexp(x, axis=-1, keepdims=True)
    top = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return top + mx.log(exp(x - top).sum(axis=-1, keepdims=True))


def attention(q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
    """softmax(q k^T + mask) v: GPT-Neo does not scale its scores. `mask` is "causal" or a boolean (T, T)."""
    if q.dtype != mx.float64:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    if isinstance(mask, str):
        mask = mx.tril(mx.ones((q.shape[2], q.shape[2]), dtype=mx.bool_))
    scores = mx.where(mask, q @ k.swapaxes(-1, -2), -mx.inf)
    return exp(scores - logsumexp(scores)) @ v


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, composed in float64 (see above); the same parameter names."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float64:
            return super().__call__(x)
        centred = x - x.mean(axis=-1, keepdims=True)
        return centred * mx.rsqrt((centred * centred).mean(axis=-1, keepdims=True) + self.eps) * self.weight + self.bias


class SharedPrompts:
    """Rows that hold a prompt and then several answers to it (a preference pair's chosen and rejected,
    Batch.segments): `segments` (B, T) 0 on the prompt and padding, k on answer k; `positions` (B, T)
    each token's position, every answer starting right after the prompt. A token sees the earlier
    tokens of the prompt and of its own answer, so each answer computes what it would in a row of
    the prompt and that answer alone, while the prompt runs once."""

    def __init__(self, positions: mx.array, segments: mx.array):
        self.positions, self.segments = positions, segments
        self.masks: dict[int | None, mx.array] = {}  # by window: built once a forward, not once a block

    def mask(self, window: int | None) -> mx.array:
        """(B, 1, T, T) boolean: the keys each query sees; in a local layer, those within its window."""
        if window not in self.masks:
            width = self.segments.shape[1]
            earlier = mx.tril(mx.ones((width, width), dtype=mx.bool_))
            query, key = self.segments[:, :, None], self.segments[:, None, :]
            visible = earlier & ((key == 0) | (key == query))
            if window is not None:
                visible = visible & (self.positions[:, :, None] - self.positions[:, None, :] < window)
            self.masks[window] = visible[:, None]
        return self.masks[window]

    def rows(self, window: int | None, batch: mx.array, position: mx.array) -> mx.array:
        """(N, 1, 1, T) boolean: mask's rows of the queries at (batch[n], position[n])."""
        return self.mask(window)[:, 0][batch, position][:, None, None, :]


class GPTNeoSelfAttention(nn.Module):
    def __init__(self, spec: GPTNeoSpec, attention_type: str):
        super().__init__()
        d = spec.hidden_size
        self.num_heads = spec.num_heads
        self.window = spec.window_size if attention_type == "local" else None
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=True)

    def __call__(self, x: mx.array, prefix: tuple[mx.array, mx.array] | None = None,
                 cache: "KVCache | None" = None, shared: SharedPrompts | None = None) -> mx.array:
        B, T, D = x.shape
        heads = lambda t: t.reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        # In bfloat16/float16 the attention itself runs in float32, as transformers' GPT-Neo does:
        # unscaled scores overflow float16 and lose whole units in bfloat16 (float64 stays float64).
        precise = mx.float64 if x.dtype == mx.float64 else mx.float32
        q, k, v = (heads(proj(x)).astype(precise) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if prefix is not None:  # prefix tuning: (heads, n, head_dim) keys and values before the text's
            k, v = (mx.concatenate([mx.broadcast_to(p.astype(precise), (B, *p.shape)), t], axis=2)
                    for p, t in zip(prefix, (k, v)))
        if cache is not None:  # generation: the keys and values of every earlier position, then these
            k, v = cache.update(k, v)
        mask = self.mask(T, k.shape[2] - T) if shared is None else shared.mask(self.window)
        out = attention(q, k, v, mask).astype(x.dtype)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, D))

    def at_rows(self, x: mx.array, batch: mx.array, position: mx.array,
                prefix: tuple[mx.array, mx.array] | None = None, shared: SharedPrompts | None = None) -> mx.array:
        """The output at (batch[n], position[n]) only, (N, D): keys and values of every position, queries
        of the rows asked for (the last block of a loss that reads a few positions; GPTNeoModel)."""
        B, T, D = x.shape
        heads = lambda t: t.reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        precise = mx.float64 if x.dtype == mx.float64 else mx.float32
        k, v = (heads(proj(x)).astype(precise) for proj in (self.k_proj, self.v_proj))
        past = 0
        if prefix is not None:
            k, v = (mx.concatenate([mx.broadcast_to(p.astype(precise), (B, *p.shape)), t], axis=2)
                    for p, t in zip(prefix, (k, v)))
            past = prefix[0].shape[1]
        q = self.q_proj(x[batch, position]).reshape(-1, self.num_heads, 1, D // self.num_heads).astype(precise)
        mask = self.row_mask(position, past, T) if shared is None else shared.rows(self.window, batch, position)
        out = attention(q, k[batch], v[batch], mask).astype(x.dtype)
        return self.out_proj(out.reshape(-1, D))

    def row_mask(self, position: mx.array, past: int, T: int) -> mx.array:
        """(N, 1, 1, past + T) boolean: the keys a query at each of `position` sees (after `past` prefix
        keys), in a local layer those within its window."""
        query = position[:, None] + past  # (N, 1): where each query sits among the keys
        key = mx.arange(past + T)[None, :]
        visible = key <= query
        if self.window is not None:
            visible = visible & (query - key < self.window)
        return visible[:, None, None, :]

    def mask(self, T: int, past: int = 0):
        """"causal", or the boolean (T, past + T) mask: query i sits at position past + i and sees key j
        when j <= past + i and, in a local layer, past + i - j < window (prefix keys count as the
        first `past` positions, as transformers' GPT-Neo counts a cache)."""
        if past == 0 and (self.window is None or T <= self.window):
            return "causal"
        i = mx.arange(past, past + T)[:, None]
        j = mx.arange(past + T)[None, :]
        visible = j <= i
        return visible & (i - j < self.window) if self.window is not None else visible


class GPTNeoAttention(nn.Module):
    # An extra level of nesting only so weight names match Hugging Face (attn.attention.q_proj).
    def __init__(self, spec: GPTNeoSpec, attention_type: str):
        super().__init__()
        self.attention = GPTNeoSelfAttention(spec, attention_type)

    def __call__(self, x: mx.array, prefix: tuple[mx.array, mx.array] | None = None,
                 cache: "KVCache | None" = None, shared: SharedPrompts | None = None) -> mx.array:
        return self.attention(x, prefix, cache, shared)


class GPTNeoMLP(nn.Module):
    def __init__(self, spec: GPTNeoSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.c_proj = nn.Linear(spec.intermediate_size, spec.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPTNeoBlock(nn.Module):
    """Pre-norm attention and MLP on the residual stream, with three empty slots a method may fill:
    `attn_adapter` and `mlp_adapter` take (sublayer output, residual stream) and return the new
    residual stream (bottleneck adapters; empty: their sum), and `intervention` takes the block's
    output and the rows' prompt lengths (LoReFT). While generating (a `cache` that already holds the
    prompt) the intervention rests: it acts on prompt positions only, as pyreft generates."""

    def __init__(self, spec: GPTNeoSpec, attention_type: str):
        super().__init__()
        self.ln_1 = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.attn = GPTNeoAttention(spec, attention_type)
        self.ln_2 = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.mlp = GPTNeoMLP(spec)
        self.attn_adapter = self.mlp_adapter = self.intervention = None

    def __call__(self, x: mx.array, prefix=None, prompt_lengths: mx.array | None = None,
                 cache: "KVCache | None" = None, shared: SharedPrompts | None = None) -> mx.array:
        generating = cache is not None and cache.offset > 0
        x = add_residual(self.attn_adapter, self.attn(self.ln_1(x), prefix, cache, shared), x)
        x = add_residual(self.mlp_adapter, self.mlp(self.ln_2(x)), x)
        return x if self.intervention is None or generating else self.intervention(x, prompt_lengths)


    def at_rows(self, x: mx.array, batch: mx.array, position: mx.array, prefix=None,
                shared: SharedPrompts | None = None) -> mx.array:
        """The block's output at (batch[n], position[n]) only, (N, D); the rest of its positions serve
        only as keys and values. Not for a block with an intervention (it acts on prompt positions).
        Dropout on its (N, D) rows draws the whole block's bits at those positions (dropout_rows)."""
        with dropout_rows(batch, position, x.shape[1]):
            residual = x[batch, position]
            residual = add_residual(self.attn_adapter,
                                    self.attn.attention.at_rows(self.ln_1(x), batch, position, prefix, shared),
                                    residual)
            return add_residual(self.mlp_adapter, self.mlp(self.ln_2(residual)), residual)


def add_residual(adapter, output: mx.array, residual: mx.array) -> mx.array:
    return residual + output if adapter is None else adapter(output, residual)


class KVCache:
    """One block's keys and values of every position so far, (B, heads, positions, head_dim): generation
    runs each new token alone and attends to these instead of running the earlier tokens again.
    Prefix tuning's keys and values enter it with the prompt, so they count as its first positions."""

    def __init__(self):
        self.keys = self.values = None

    @property
    def offset(self) -> int:
        """The positions held: where the next token sits."""
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys, values = mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values


class GPTNeoModel(nn.Module):
    """Embeddings, blocks, final norm; two empty slots a method may fill: `prompt()` gives (n, d)
    virtual-token embeddings put before the text's (prompt tuning, P-tuning), `prefix()` one
    (keys, values) pair of (heads, n, head_dim) per block (prefix tuning).

    Virtual tokens take the first n positions and the text starts at position n, as with PEFT on
    transformers' GPT-Neo (its cache of prefix keys counts as past positions); local layers' windows
    count them as ordinary earlier positions. Only the text's positions come out, so the loss and
    prediction rows index the text as without the method."""

    def __init__(self, spec: GPTNeoSpec):
        super().__init__()
        self.wte = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.wpe = nn.Embedding(spec.max_positions, spec.hidden_size)
        self.h = [GPTNeoBlock(spec, kind) for kind in spec.attention_layers]
        self.ln_f = LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.prompt = self.prefix = None
        self.checkpoint_blocks = False

    def __call__(self, input_ids: mx.array, prompt_lengths: mx.array | None = None,
                 layer: int | None = None, cache: list[KVCache] | None = None,
                 rows: mx.array | None = None, positions: mx.array | None = None,
                 segments: mx.array | None = None) -> mx.array:
        """The final hidden states (after ln_f); with `layer` < the number of blocks, the hidden states after
        that many blocks (transformers' hidden_states[layer]; 0: the embeddings), unnormed. With `cache`
        (one KVCache per block, filled as it goes) the ids continue the positions the cache holds; the
        virtual tokens and prefixes enter with the first call only. With `rows` ((N,) flat indices into
        the B x T text positions) only those rows' final hidden states, (N, d): the last block then runs
        its queries, output projection and MLP on those rows alone (`at_rows`), the work a loss that
        reads a few positions (label words, a head's last token) would otherwise throw away. With
        `positions` and `segments` ((B, T) each), rows of a prompt and several answers (SharedPrompts)."""
        B, T = input_ids.shape
        shared = None if segments is None else SharedPrompts(positions, segments)
        if shared is not None and (self.prompt is not None or self.prefix is not None or cache is not None):
            raise ValueError("rows that share a prompt take no virtual tokens and no cache")
        first = cache is None or cache[0].offset == 0
        x = self.wte(input_ids)
        if self.prompt is not None and first:
            virtual = self.prompt().astype(x.dtype)
            x = mx.concatenate([mx.broadcast_to(virtual, (B, *virtual.shape)), x], axis=1)
        prefixes = self.prefix() if self.prefix is not None and first else [None] * len(self.h)
        past = 0 if prefixes[0] is None else prefixes[0][0].shape[1]
        if not first:
            past = cache[0].offset
        x = x + self.wpe(mx.arange(past, past + x.shape[1]) if shared is None else shared.positions)
        last = len(self.h) - 1
        for i, (block, prefix) in enumerate(zip(self.h, prefixes)):
            if i == layer:
                return x[:, x.shape[1] - T:]
            if i == last and reads_few_rows(rows, B) and block.intervention is None and cache is None:
                return self.ln_f(block.at_rows(x, rows // T, rows % T + x.shape[1] - T, prefix, shared))
            x = run_block(block, x, prefix, prompt_lengths, self.checkpoint_blocks,
                          None if cache is None else cache[i], shared)
        hidden = self.ln_f(x[:, x.shape[1] - T:])
        return hidden if rows is None else hidden.reshape(B * T, -1)[rows]


def reads_few_rows(rows: mx.array | None, batch_size: int) -> bool:
    """Whether the last block runs at the rows asked for only (`at_rows`): a loss that reads about one
    position per sequence (a head's last token, the label words). Each such row gathers its
    sequence's keys and values, so a loss that reads most positions (causal LM, instructions) runs
    the block whole."""
    return rows is not None and rows.shape[0] <= 2 * batch_size


def run_block(block: nn.Module, x: mx.array, prefix, prompt_lengths, checkpoint: bool,
              cache: KVCache | None = None, shared: SharedPrompts | None = None) -> mx.array:
    """One block. With `checkpoint`, only the block's input is kept for the backward, which runs
    the block again (mx.checkpoint); the recompute re-enters the micro-batch's dropout scope, and the
    shared generator's masks depend on nothing else, so the gradients are those of the plain path.
    Trainable parameters (and the prefix, computed outside the block) go in as arguments so their
    gradients flow through."""
    if not checkpoint or not block.training:
        return block(x, prefix, prompt_lengths, cache, shared)
    scope = current_dropout_scope()

    def run(parameters, x, *prefix):
        block.update(parameters)
        with dropout_scope(scope) if scope is not None else contextlib.nullcontext():
            return block(x, prefix or None, prompt_lengths, None, shared)

    return mx.checkpoint(run)(block.trainable_parameters(), x, *(prefix or ()))


class GPTNeoForCausalLM(nn.Module):
    """`model(ids)` gives the final hidden states; `model.logits(h)` projects only the rows asked for.
    The empty `score` slot takes a classification head (twintune/tasks.py): `logits` then gives class scores."""

    def __init__(self, spec: GPTNeoSpec):
        super().__init__()
        self.spec = spec
        self.transformer = GPTNeoModel(spec)
        self.score = None
        self.v_head = None  # the slot of PPO's value head (tasks/ppo.py)

    def __call__(self, input_ids: mx.array, prompt_lengths: mx.array | None = None,
                 layer: int | None = None, cache: list[KVCache] | None = None,
                 rows: mx.array | None = None, positions: mx.array | None = None,
                 segments: mx.array | None = None) -> mx.array:
        """Final hidden states (B, T, d); `prompt_lengths` (B,) are the rows' prompt tokens, for
        methods that act on prompt positions (none given: each whole row is its prompt); `layer`: the
        hidden states after that many blocks instead; `cache`: make_cache()'s, to generate; `rows`: only
        those flat positions', (N, d); `positions` and `segments`: rows that share a prompt
        (GPTNeoModel.__call__)."""
        return self.transformer(input_ids, prompt_lengths, layer, cache, rows, positions, segments)

    def make_cache(self) -> list[KVCache]:
        """An empty key/value cache, one per block, for generation."""
        return [KVCache() for _ in self.transformer.h]

    def logits(self, hidden: mx.array) -> mx.array:
        """The output layer on the rows given: vocabulary scores (lm_head, tied to the token embedding),
        or with a head in the `score` slot, class scores."""
        if self.score is not None:
            return self.score(hidden)
        return self.transformer.wte.as_linear(hidden)

    def output_layer(self) -> nn.Module:
        """The module `logits` projects with (no head): a checkpointed loss chunk passes its trainable
        values in explicitly (mx.checkpoint differentiates its arguments only)."""
        return self.transformer.wte
