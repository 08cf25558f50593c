"""GPT-Neo in PyTorch: transformers' own `GPTNeoForCausalLM`, fed the shared numpy weights.

The mirror of backends/mlx/gpt_neo.py: `model(ids)` gives the final hidden states and
`model.logits(h)` projects only the rows asked for, so the loss never builds a full
(batch, time, vocab) tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from twintune.models import GPTNeoSpec


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


class GPTNeoForCausalLM(nn.Module):
    def __init__(self, spec: GPTNeoSpec, weights: dict[str, np.ndarray]):
        super().__init__()
        from transformers import GPTNeoForCausalLM as HFGPTNeo
        from transformers.initialization import no_init_weights

        self.spec = spec
        with no_init_weights():  # the weights come from the checkpoint; skip a random init of 1.3B
            hf = HFGPTNeo(transformers_config(spec))
        state = {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in weights.items()}
        missing, unexpected = hf.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise RuntimeError(f"weights do not fit GPT-Neo: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
        hf.eval()  # GPT-Neo's own dropouts are 0 anyway; only adapters' dropout is trained with
        self.transformer = hf.transformer
        self.lm_head = hf.lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # No attention mask: padding is on the right, and causal attention never looks right.
        return self.transformer(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
