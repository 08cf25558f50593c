"""Helpers several test modules share: a tiny mlx-lm llama on disk, and transformers' logits."""

import json

import numpy as np
import torch

LLAMA = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300, tie_word_embeddings=False)


def write_tiny_llama(path, vocab_size: int = 1024, seed: int = 3, tokenizer: bool = True):
    """A tiny random llama model directory as mlx-lm reads it (with the built-in model's tokenizer)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from twintune.formats.tiny_model import builtin_model_dir

    config = dict(LLAMA, vocab_size=vocab_size)
    mx.random.seed(seed)
    inner = llama.Model(llama.ModelArgs(**config))
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(inner.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).write_bytes((builtin_model_dir("tiny-gpt-neo") / name).read_bytes())
    return path


def hf_model(model_dir):
    """transformers' GPTNeoForCausalLM from a directory, float32, in eval mode."""
    from transformers import GPTNeoForCausalLM

    return GPTNeoForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    """A transformers (or PEFT) model's logits for token ids, as numpy float32."""
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


def objective_on_both_frameworks(objective, values: np.ndarray, batch):
    """An objective's loss and its gradient with respect to `values`, float64, under torch's autograd
    and MLX's: ((torch loss, torch gradient), (MLX loss, MLX gradient)) as floats and numpy arrays."""
    import mlx.core as mx

    from twintune.backends.mlx.backend import MLXOps
    from twintune.backends.torch.backend import TorchOps

    tensor = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    torch_loss, _ = objective.loss(TorchOps(torch.float64, torch.device("cpu")), tensor, batch)
    torch_loss.backward()
    mlx_loss, mlx_grad = mx.value_and_grad(lambda v: objective.loss(MLXOps(mx.float64), v, batch)[0])(
        mx.array(values, dtype=mx.float64))
    return (torch_loss.item(), tensor.grad.numpy()), (mlx_loss.item(), np.array(mlx_grad))


def hidden_at(backend, batch, targets=None) -> np.ndarray:
    """The final hidden states at a batch's targets (those of index `targets` only, through the
    model's `rows` argument: its last block then runs at those rows alone), float64 numpy; rows
    that share a prompt pass their positions and segments."""
    shared = {} if batch.segments is None else {"positions": batch.positions, "segments": batch.segments}
    ids, lengths = batch.input_ids, batch.prompt_lengths
    rows = batch.target_positions if targets is None else batch.target_positions[targets]
    if backend.name == "torch":
        def tensor(a):
            return torch.from_numpy(np.asarray(a, np.int64))

        with torch.no_grad():
            args = {k: tensor(v) for k, v in shared.items()}
            if targets is not None:
                return backend.model(tensor(ids), tensor(lengths), rows=tensor(rows), **args).double().numpy()
            hidden = backend.model(tensor(ids), tensor(lengths), **args)
            return hidden.reshape(-1, hidden.shape[-1])[tensor(rows)].double().numpy()
    import mlx.core as mx

    args = {k: mx.array(v) for k, v in shared.items()}
    if targets is not None:
        return np.array(backend.model(mx.array(ids), mx.array(lengths), rows=mx.array(rows), **args)).astype(np.float64)
    hidden = backend.model(mx.array(ids), mx.array(lengths), **args)
    return np.array(hidden.reshape(-1, hidden.shape[-1])[mx.array(rows)]).astype(np.float64)
