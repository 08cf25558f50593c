"""GPT-Neo in PyTorch, one file, top to bottom: the mirror of backends/mlx/gpt_neo.py.

What makes GPT-Neo GPT-Neo: learned positions; blocks alternating global and local
(sliding-window) causal attention; attention scores NOT scaled by 1/sqrt(head_dim); q/k/v
without bias, out_proj with bias; gelu_new; lm_head tied to the token embedding.
Module names follow Hugging Face's so weights load by name (transformer.h.0.attn.attention.q_proj,
...); there is no lm_head parameter: `logits` multiplies by transformer.wte.weight.

Why our own file and not transformers' `GPTNeoForCausalLM`: the two backends now read the same,
class for class and line for line, so a difference between them is a difference of framework,
not of model code. And a method that reaches inside the model (prefix tuning's extra keys and
values, adapters after the attention or the MLP) becomes a plain argument of these few classes,
written the same way in both files, instead of a patch on transformers' internals, which change
from release to release. transformers stays the reference the parity tests compare with
(tests/parity/test_logits_parity.py), and this file does not import it.

What keeps it frugal with memory:
- built on the meta device, then given the checkpoint's tensors themselves (`assign=True`, shared
  with numpy where the dtype matches): no weight is allocated twice, and a layer that arrives in
  NF4 never exists in float32 at all;
- attention is one scaled_dot_product_attention call, so no (B, H, T, T) weights are kept; the
  (windowed) causal mask is built when needed, as MLX does, not kept per block (transformers keeps
  a (max_positions)^2 mask per block, 50 MB on GPT-Neo-125M and 100 MB on 1.3B);
- gelu_new is one fused op (transformers' NewGELUActivation keeps four (B, T, 4d) tensors per
  layer for the backward; values agree within 3e-7);
- `model(ids)` gives the final hidden states and `model.logits(h)` projects only the rows asked
  for, so the loss never builds a full (batch, time, vocab) tensor;
- with `checkpoint_blocks()`, only each block's input is kept for the backward.

Unlike MLX, torch's layer norm, softmax and attention are float64-exact on float64 tensors, so
float64 needs no composed kernels here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from twintune.backends.torch.nf4 import nf4_linear, warn_about_bitsandbytes_mismatches
from twintune.dropout import dropout_rows
from twintune.models import GPTNeoSpec
from twintune.quant.nf4 import NF4Tensor


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-Neo's tanh GELU, as one fused op: its backward keeps only x."""
    return F.gelu(x, approximate="tanh")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str | torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + mask) v: GPT-Neo does not scale its scores (scale=1.0). `mask` is "causal" or a
    boolean (T, T), True where a position may attend. One fused call: no (B, H, T, T) weights are kept."""
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


class SharedPrompts:
    """Rows that hold a prompt and then several answers to it (a preference pair's chosen and rejected,
    Batch.segments): `segments` (B, T) 0 on the prompt and padding, k on answer k; `positions` (B, T)
    each token's position, every answer starting right after the prompt. A token sees the earlier
    tokens of the prompt and of its own answer, so each answer computes what it would in a row of
    the prompt and that answer alone, while the prompt runs once."""

    def __init__(self, positions: torch.Tensor, segments: torch.Tensor):
        self.positions, self.segments = positions, segments
        self.masks: dict[int | None, torch.Tensor] = {}  # by window: built once a forward, not once a block

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, T, T) boolean: the keys each query sees; in a local layer, those within its window."""
        if window not in self.masks:
            width = self.segments.shape[1]
            earlier = torch.ones(width, width, dtype=torch.bool, device=self.segments.device).tril()
            query, key = self.segments[:, :, None], self.segments[:, None, :]
            visible = earlier & ((key == 0) | (key == query))
            if window is not None:
                visible = visible & (self.positions[:, :, None] - self.positions[:, None, :] < window)
            self.masks[window] = visible[:, None]
        return self.masks[window]

    def rows(self, window: int | None, batch: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: "KVCache | None" = None, shared: SharedPrompts | None = None) -> torch.Tensor:
        B, T, D = x.shape
        heads = lambda t: t.reshape(B, T, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        # In bfloat16/float16 the attention itself runs in float32, as transformers' GPT-Neo does:
        # unscaled scores overflow float16 and lose whole units in bfloat16 (float64 stays float64).
        precise = torch.float64 if x.dtype == torch.float64 else torch.float32
        q, k, v = (heads(proj(x)).to(precise) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if prefix is not None:  # prefix tuning: (heads, n, head_dim) keys and values before the text's
            k, v = (torch.cat([p.to(precise).expand(B, *p.shape), t], dim=2) for p, t in zip(prefix, (k, v)))
        if cache is not None:  # generation: the keys and values of every earlier position, then these
            k, v = cache.update(k, v)
        mask = self.mask(T, k.shape[2] - T, x.device) if shared is None else shared.mask(self.window)
        out = attention(q, k, v, mask).to(x.dtype)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))

    def at_rows(self, x: torch.Tensor, batch: torch.Tensor, position: torch.Tensor,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                shared: SharedPrompts | None = None) -> torch.Tensor:
        """The output at (batch[n], position[n]) only, (N, D): keys and values of every position, queries
        of the rows asked for (the last block of a loss that reads a few positions; GPTNeoModel)."""
        B, T, D = x.shape
        heads = lambda t: t.reshape(B, T, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        precise = torch.float64 if x.dtype == torch.float64 else torch.float32
        k, v = (heads(proj(x)).to(precise) for proj in (self.k_proj, self.v_proj))
        past = 0
        if prefix is not None:
            k, v = (torch.cat([p.to(precise).expand(B, *p.shape), t], dim=2) for p, t in zip(prefix, (k, v)))
            past = prefix[0].shape[1]
        q = self.q_proj(x[batch, position]).reshape(-1, self.num_heads, 1, D // self.num_heads).to(precise)
        mask = self.row_mask(position, past, T, x.device) if shared is None else shared.rows(self.window, batch, position)
        out = attention(q, k[batch], v[batch], mask).to(x.dtype)
        return self.out_proj(out.reshape(-1, D))

    def row_mask(self, position: torch.Tensor, past: int, T: int, device: torch.device) -> torch.Tensor:
        """(N, 1, 1, past + T) boolean: the keys a query at each of `position` sees (after `past` prefix
        keys), in a local layer those within its window."""
        query = position[:, None] + past  # (N, 1): where each query sits among the keys
        key = torch.arange(past + T, device=device)[None, :]
        visible = key <= query
        if self.window is not None:
            visible = visible & (query - key < self.window)
        return visible[:, None, None, :]

    def mask(self, T: int, past: int, device: torch.device) -> str | torch.Tensor:
        """"causal", or the boolean (T, past + T) mask: query i sits at position past + i and sees key j
        when j <= past + i and, in a local layer, past + i - j < window (prefix keys count as the
        first `past` positions, as transformers' GPT-Neo counts a cache). Built explicitly whenever
        there are more keys than queries: torch's is_causal would align the triangle top-left."""
        if past == 0 and (self.window is None or T <= self.window):
            return "causal"
        i = torch.arange(past, past + T, device=device)[:, None]
        j = torch.arange(past + T, device=device)[None, :]
        visible = j <= i
        return visible & (i - j < self.window) if self.window is not None else visible


class GPTNeoAttention(nn.Module):
    # An extra level of nesting only so weight names match Hugging Face (attn.attention.q_proj).
    def __init__(self, spec: GPTNeoSpec, attention_type: str):
        super().__init__()
        self.attention = GPTNeoSelfAttention(spec, attention_type)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: "KVCache | None" = None, shared: SharedPrompts | None = None) -> torch.Tensor:
        return self.attention(x, prefix, cache, shared)


class GPTNeoMLP(nn.Module):
    def __init__(self, spec: GPTNeoSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.c_proj = nn.Linear(spec.intermediate_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPTNeoBlock(nn.Module):
    """Pre-norm attention and MLP on the residual stream, with three empty slots a method may fill:
    `attn_adapter` and `mlp_adapter` take (sublayer output, residual stream) and return the new
    residual stream (bottleneck adapters; empty: their sum), and `intervention` takes the block's
    output and the rows' prompt lengths (LoReFT). While generating (a `cache` that already holds the
    prompt) the intervention rests: it acts on prompt positions only, as pyreft generates."""

    def __init__(self, spec: GPTNeoSpec, attention_type: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.attn = GPTNeoAttention(spec, attention_type)
        self.ln_2 = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.mlp = GPTNeoMLP(spec)
        self.attn_adapter = self.mlp_adapter = self.intervention = None

    def forward(self, x: torch.Tensor, prefix=None, prompt_lengths: torch.Tensor | None = None,
                cache: "KVCache | None" = None, shared: SharedPrompts | None = None) -> torch.Tensor:
        generating = cache is not None and cache.offset > 0
        x = add_residual(self.attn_adapter, self.attn(self.ln_1(x), prefix, cache, shared), x)
        x = add_residual(self.mlp_adapter, self.mlp(self.ln_2(x)), x)
        return x if self.intervention is None or generating else self.intervention(x, prompt_lengths)


    def at_rows(self, x: torch.Tensor, batch: torch.Tensor, position: torch.Tensor, prefix=None,
                shared: SharedPrompts | None = None) -> torch.Tensor:
        """The block's output at (batch[n], position[n]) only, (N, D); the rest of its positions serve
        only as keys and values. Not for a block with an intervention (it acts on prompt positions).
        Dropout on its (N, D) rows draws the whole block's bits at those positions (dropout_rows)."""
        with dropout_rows(batch, position, x.shape[1]):
            residual = x[batch, position]
            residual = add_residual(self.attn_adapter,
                                    self.attn.attention.at_rows(self.ln_1(x), batch, position, prefix, shared),
                                    residual)
            return add_residual(self.mlp_adapter, self.mlp(self.ln_2(residual)), residual)


def add_residual(adapter, output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
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

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)
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
        self.h = nn.ModuleList(GPTNeoBlock(spec, kind) for kind in spec.attention_layers)
        self.ln_f = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.prompt = self.prefix = None
        self.checkpoint_blocks = False

    def forward(self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None = None,
                layer: int | None = None, cache: list[KVCache] | None = None,
                rows: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (after ln_f); with `layer` < the number of blocks, the hidden states after
        that many blocks (transformers' hidden_states[layer]; 0: the embeddings), unnormed. With `cache`
        (one KVCache per block, filled as it goes) the ids continue the positions the cache holds; the
        virtual tokens and prefixes enter with the first call only. With `rows` ((N,) flat indices into
        the B x T text positions) only those rows' final hidden states, (N, d): the last block then runs
        its queries, output projection and MLP on those rows alone (`at_rows`), the work a loss that
        reads a few positions (label words, a head's last token) would otherwise throw away. With
        `positions` and `segments` ((B, T) each), rows of a prompt and several answers (SharedPrompts)."""
        # No attention mask: padding is on the right, and causal attention never looks right.
        B, T = input_ids.shape
        shared = None if segments is None else SharedPrompts(positions, segments)
        if shared is not None and (self.prompt is not None or self.prefix is not None or cache is not None):
            raise ValueError("rows that share a prompt take no virtual tokens and no cache")
        first = cache is None or cache[0].offset == 0
        x = self.wte(input_ids)
        if self.prompt is not None and first:
            virtual = self.prompt().to(x.dtype)
            x = torch.cat([virtual.expand(B, *virtual.shape), x], dim=1)
        prefixes = self.prefix() if self.prefix is not None and first else [None] * len(self.h)
        past = 0 if prefixes[0] is None else prefixes[0][0].shape[1]
        if not first:
            past = cache[0].offset
        x = x + self.wpe(torch.arange(past, past + x.shape[1], device=input_ids.device) if shared is None
                         else shared.positions)
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


def reads_few_rows(rows: torch.Tensor | None, batch_size: int) -> bool:
    """Whether the last block runs at the rows asked for only (`at_rows`): a loss that reads about one
    position per sequence (a head's last token, the label words). Each such row gathers its
    sequence's keys and values, so a loss that reads most positions (causal LM, instructions) runs
    the block whole."""
    return rows is not None and rows.shape[0] <= 2 * batch_size


def run_block(block: nn.Module, x: torch.Tensor, prefix, prompt_lengths, checkpoint_block: bool,
              cache: KVCache | None = None, shared: SharedPrompts | None = None) -> torch.Tensor:
    """One block. With `checkpoint_block`, only the block's input is kept for the backward, which runs
    the block again (torch.utils.checkpoint, non-reentrant). The recompute draws the same dropout
    masks: they depend only on the micro-batch's key, and the backend runs the backward inside the
    same `dropout_masks(key)` as the forward (MLX's run_block re-enters the key itself instead)."""
    if not checkpoint_block or not block.training:
        return block(x, prefix, prompt_lengths, cache, shared)
    return checkpoint(block, x, prefix, prompt_lengths, None, shared, use_reentrant=False)


class GPTNeoForCausalLM(nn.Module):
    """`model(ids)` gives the final hidden states; `model.logits(h)` projects only the rows asked for.

    `weights` are the checkpoint's numpy arrays by Hugging Face name; `quantized` the NF4 layers
    (by layer name), which become bitsandbytes' or our NF4 layers (backends/torch/nf4.py). The empty
    `score` slot takes a classification head (twintune/tasks.py): `logits` then gives class scores."""

    def __init__(self, spec: GPTNeoSpec, weights: dict[str, np.ndarray], quantized: dict[str, NF4Tensor] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        # Built on the meta device, then given the checkpoint's tensors themselves (assign=True,
        # shared with numpy): no weight is allocated twice, and a layer that arrives in NF4 never
        # exists in float32 at all.
        with torch.device("meta"):
            self.transformer = GPTNeoModel(spec)
        state = {name: torch.from_numpy(np.ascontiguousarray(w)).to(dtype) for name, w in weights.items()}
        quantized = quantized or {}
        nf4_layers = []
        for name, weight in quantized.items():
            bias = state.pop(f"{name}.bias", None)
            parent_name, attr = name.rsplit(".", 1)
            nf4_layers.append(nf4_linear(weight, bias, compute_dtype=dtype))
            setattr(self.get_submodule(parent_name), attr, nf4_layers[-1])
        warn_about_bitsandbytes_mismatches(nf4_layers)  # once per model, naming the layers' shapes
        missing, unexpected = self.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if m.rsplit(".", 1)[0] not in quantized]
        if unexpected or missing:
            raise RuntimeError(f"weights do not fit GPT-Neo: missing {missing}, unexpected {unexpected}")
        self.score = None
        self.v_head = None  # the slot of PPO's value head (tasks/ppo.py)
        self.eval()  # GPT-Neo has no dropout of its own; only adapters' dropout is trained with

    def checkpoint_blocks(self) -> None:
        """Keep only each block's input for the backward and run the block again there (run_block)."""
        self.transformer.checkpoint_blocks = True

    def forward(self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor | None = None,
                layer: int | None = None, cache: list[KVCache] | None = None,
                rows: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, d); `prompt_lengths` (B,) are the rows' prompt tokens, for
        methods that act on prompt positions (none given: each whole row is its prompt); `layer`: the
        hidden states after that many blocks instead; `cache`: make_cache()'s, to generate; `rows`: only
        those flat positions', (N, d); `positions` and `segments`: rows that share a prompt
        (GPTNeoModel.forward)."""
        return self.transformer(input_ids, prompt_lengths, layer, cache, rows, positions, segments)

    def make_cache(self) -> list[KVCache]:
        """An empty key/value cache, one per block, for generation."""
        return [KVCache() for _ in self.transformer.h]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on the rows given: vocabulary scores (lm_head, tied to the token embedding),
        or with a head in the `score` slot, class scores."""
        if self.score is not None:
            return self.score(hidden)
        return F.linear(hidden, self.transformer.wte.weight)
