"""GPT-Neo in PyTorch: transformers' own `GPTNeoForCausalLM`, fed the shared numpy weights.

The mirror of backends/mlx/gpt_neo.py: `model(ids)` gives the final hidden states and
`model.logits(h)` projects only the rows asked for, so the loss never builds a full
(batch, time, vocab) tensor.
"""

from __future__ import annotations

import functools
import types

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from twintune.backends.torch.nf4 import nf4_linear, warn_about_bitsandbytes_mismatches
from twintune.models import GPTNeoSpec
from twintune.quant.nf4 import NF4Tensor


def transformers_config(spec: GPTNeoSpec):
    from transformers import GPTNeoConfig

    pattern = [[list(spec.attention_layers), 1]]
    return GPTNeoConfig(
        vocab_size=spec.vocab_size, max_position_embeddings=spec.max_positions,
        hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size, attention_types=pattern,
        window_size=spec.window_size, layer_norm_epsilon=spec.layer_norm_eps,
        activation_function="gelu_new", embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
    )


def fused_attention(self, query, key, value, attention_mask=None):
    """GPT-Neo's attention as one scaled_dot_product_attention call, in place of transformers' eager
    matmul-mask-softmax-matmul: no (B, H, T, T) weights are kept. GPT-Neo does not scale by
    1/sqrt(head_dim), hence scale=1.0. Padding is on the right, so the (windowed) causal mask is
    the whole mask, built when needed (as MLX does) rather than kept: transformers keeps a
    (max_positions)^2 mask per block, 50 MB on GPT-Neo-125M and 100 MB on 1.3B. In bfloat16/float16
    the attention itself runs in float32, as transformers' GPT-Neo does: unscaled scores overflow
    float16 and lose whole units in bfloat16 (float64 stays float64)."""
    dtype, length = query.dtype, query.shape[-2]
    precise = torch.float64 if dtype == torch.float64 else torch.float32
    query, key, value = query.to(precise), key.to(precise), value.to(precise)
    if self.attention_type == "global" or length <= self.config.window_size:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=1.0)
    else:
        mask = causal_mask(length, self.attention_type, self.config.window_size).to(query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=1.0)
    return out.to(dtype), None


def causal_mask(positions: int, attention_type: str, window: int) -> torch.Tensor:
    """GPT-Neo's boolean attention mask (1, 1, T, T): causal, and for local layers within the window."""
    mask = torch.tril(torch.ones((positions, positions), dtype=torch.bool))
    if attention_type == "local":
        mask = mask & ~torch.tril(mask, -window)
    return mask.view(1, 1, positions, positions)


class GPTNeoForCausalLM(nn.Module):
    def __init__(self, spec: GPTNeoSpec, weights: dict[str, np.ndarray], quantized: dict[str, NF4Tensor] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import GPTNeoForCausalLM as HFGPTNeo

        self.spec = spec
        # Built on the meta device, then given the checkpoint's tensors themselves (assign=True,
        # shared with numpy): no weight is allocated twice, and a layer that arrives in NF4 never
        # exists in float32 at all.
        with torch.device("meta"):
            hf = HFGPTNeo(transformers_config(spec))
        state = {name: torch.from_numpy(np.ascontiguousarray(w)).to(dtype) for name, w in weights.items()}
        nf4_layers = []
        for name, weight in (quantized or {}).items():
            bias = state.pop(f"{name}.bias", None)
            parent_name, attr = name.rsplit(".", 1)
            nf4_layers.append(nf4_linear(weight, bias, compute_dtype=dtype))
            setattr(hf.get_submodule(parent_name), attr, nf4_layers[-1])
        warn_about_bitsandbytes_mismatches(nf4_layers)  # once per model, naming the layers' shapes
        missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if m != "lm_head.weight" and m.rsplit(".", 1)[0] not in (quantized or {})]
        if unexpected or missing:
            raise RuntimeError(f"weights do not fit GPT-Neo: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
        for block in hf.transformer.h:
            del block.attn.attention.bias  # transformers' mask buffer; fused_attention builds its own
            block.attn.attention._attn = types.MethodType(fused_attention, block.attn.attention)
            # gelu_new as one fused op: transformers' NewGELUActivation keeps four (B, T, 4d) tensors
            # per layer for the backward; values agree within 3e-7.
            block.mlp.act = nn.GELU(approximate="tanh")
        hf.eval()  # GPT-Neo's own dropouts are 0 anyway; only adapters' dropout is trained with
        self.transformer = hf.transformer
        self.lm_head = hf.lm_head

    def checkpoint_blocks(self) -> None:
        """Keep only each block's input for the backward and run the block again there
        (torch.utils.checkpoint; the random state is replayed, so dropout masks match)."""
        for block in self.transformer.h:
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        self.transformer.gradient_checkpointing = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # No attention mask: padding is on the right, and causal attention never looks right.
        return self.transformer(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
