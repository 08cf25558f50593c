"""Rebuild the built-in `builtin:tiny-gpt-neo`: a tiny GPT-Neo pre-trained on the synthetic corpus.

    python tools/pretrain_tiny_model.py [--out twintune/assets/tiny-gpt-neo] [--steps 3000]

Why pre-train: fine-tuning adapts what a model already knows. A frozen random GPT-Neo attends
almost uniformly, so one direction word ("rose" vs "fell") is a thirtieth of the signal at the
answer position and LoRA learns little beyond neutral vs polar (about 0.65 validation accuracy
on the demo). Next-token steps on unlabelled sentences of the same domain give the model a real
language model's footing, as a downloaded checkpoint has. 300 steps were enough for LoRA (0.95)
but left attention near uniform, and prompt tuning and P-tuning, which change only what the
model reads, stayed at chance; after 3000 steps (16 passes over the 6000 sentences) they learn
(0.56 and 0.51; 1000 steps: still chance; a 48,000-sentence corpus for 3000 steps: 0.42 and 0.37,
measured with tests/methods/test_method_learning.py's settings). The corpus is a separate stream
of the synthetic generator (seed 20000) with no labels, so nothing about the sentiment task is
learned here.

The result is committed under twintune/assets/ so every machine and backend starts from the
same bytes (training it on each machine would give slightly different floats per BLAS). Needs
torch; runs in about 3 minutes on one CPU core (`OMP_NUM_THREADS=1`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

CORPUS_SEED = 20_000


def pretrain(out: Path, steps: int, lr: float, batch_size: int, corpus_size: int, seed: int) -> float:
    import torch
    from tokenizers import Tokenizer

    from twintune.backends.torch.gpt_neo import GPTNeoForCausalLM
    from twintune.data.synthetic import synthetic_financial_sentiment
    from twintune.formats.checkpoint import load_checkpoint
    from twintune.formats.safetensors_io import write_safetensors
    from twintune.formats.tiny_model import write_tiny_model
    from twintune.models import GPTNeoSpec, gpt_neo_weights

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = write_tiny_model(Path(tmp) / "random", seed=seed)
        checkpoint = load_checkpoint(str(random_dir))
        spec = GPTNeoSpec.from_config(checkpoint.config)
        model = GPTNeoForCausalLM(spec, gpt_neo_weights(spec, checkpoint.weights))
        tokenizer = Tokenizer.from_file(str(random_dir / "tokenizer.json"))
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((random_dir / name).read_bytes())

    eos = tokenizer.token_to_id("<|endoftext|>")
    texts = [e.text for e in synthetic_financial_sentiment(n=corpus_size, seed=CORPUS_SEED)]
    rows = [tokenizer.encode(text).ids + [eos] for text in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        batch = [rows[i] for i in rng.integers(0, len(rows), batch_size)]
        width = max(map(len, batch))
        ids = torch.full((batch_size, width), eos, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.bool)
        for r, row in enumerate(batch):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = True
        logits = model.logits(model(ids[:, :-1]))
        target_mask = mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[target_mask], ids[:, 1:][target_mask])
        for group in optimizer.param_groups:  # 50 warm-up steps, then linear decay
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (1 - step / steps)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)

    weights = {f"transformer.{name}": p.detach().numpy().astype(np.float32)
               for name, p in model.transformer.named_parameters()}
    write_safetensors(out / "model.safetensors", weights, metadata={"format": "pt"})
    (out / "PRETRAINING.json").write_text(json.dumps({
        "made_by": "tools/pretrain_tiny_model.py", "steps": steps, "lr": lr, "batch_size": batch_size,
        "corpus": f"synthetic_financial_sentiment(n={corpus_size}, seed={CORPUS_SEED}), texts only",
        "seed": seed, "final_loss": round(loss.item(), 4),
    }, indent=2) + "\n")
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "twintune" / "assets" / "tiny-gpt-neo")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--corpus-size", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrain(args.out, args.steps, args.lr, args.batch_size, args.corpus_size, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
