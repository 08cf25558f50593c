"""The torch backend against Hugging Face transformers + PEFT on one epoch of the task, same run.

    python -m benchmarks.compare_torch [--method lora|dora|ia3|bitfit|last_blocks|full|prompt|ptuning|prefix
                                        |adapter|loreft] [--head | --instruction] [--quick]
        [--shape 125m|1.3b|tiny] [--examples N] [--repeats R] [--compile] [--kinds K,...] [--no-save]

Three ways to train the same method (AdamW lr 2e-4, batch 8; --method, default lora) on the same
tokenized financial-sentiment examples, loss on the label-word tokens only. The methods, with the
same settings on both sides (METHODS below):

  lora         r=8, alpha=16, q_proj + v_proj        PEFT LoraConfig
  dora         the same                              PEFT LoraConfig(use_dora=True)
  ia3          q_proj, v_proj, c_proj (c_proj feed-forward: its input scaled; PEFT's gpt_neo default)
                                                     PEFT IA3Config
  bitfit       every bias                            transformers, requires_grad on the biases only
  last_blocks  n=2: the last two blocks + ln_f       transformers, requires_grad on those only
  full         every parameter (wte/lm_head once)    transformers, every parameter
  prompt       20 virtual tokens                     PEFT PromptTuningConfig
  ptuning      20 virtual tokens, MLP encoder        PEFT PromptEncoderConfig (MLP)
  prefix       20 virtual tokens per layer           PEFT PrefixTuningConfig
  adapter      Houlsby, reduction factor 16          twintune's LoRA on q_proj + v_proj at the rank
  loreft       r=4, every block, f1+l1               that trains as many parameters (no PEFT method;
                                                     AdapterHub has no GPT-Neo): kind lora_equal
  (PEFT has no BitFit or last-blocks: the reference is plain transformers with the same
  parameters trainable; each row records its trainable count, and the two sides must agree.)

  trainer    the way blog posts set it up: transformers' Trainer (+ PEFT), every example padded
             to max_length 128, full-vocabulary logits at every position (follows --method)
  fair_loop  transformers (+ PEFT) in a plain loop with dynamic padding (each batch padded to its
             own longest row), as a careful user would write it
  twintune   twintune's torch backend: length-grouped batches (train.group_by_length), logits
             only where the loss is taken
  twintune_compiled  (with --compile) the same with train.compile (torch.compile, dynamic shapes);
             its warm-up epoch, reported apart, pays for compiling
  lora_equal (adapter, loreft) twintune's LoRA on q_proj + v_proj with as many trainable
             parameters as the method, as near as a rank allows: what the same budget costs with LoRA

With --head (issue 14's head task) the method trains with a linear classification head instead of
the label words: twintune's recipe gets `task: {name: classification, head: linear}` (a 3 x hidden
`score` on the last prompt token), and the reference is transformers' GPTNeoForSequenceClassification
(num_labels 3, pad_token_id = eos, so it pools the last real token) with the method's PEFT config
for task_type SEQ_CLS (which trains `score` beside it: modules_to_save) or, for bitfit, last_blocks
and full, `score` trainable beside the same parameters. Both sides see the prompt alone (no label
word) and take the cross-entropy of the 3 class scores. Not for the virtual-token methods (PEFT's
SEQ_CLS model feeds them embeddings, so it cannot find the last real token), nor adapter/loreft;
the trainer kind is not built for it (default kinds: twintune, fair_loop).

With --instruction (issue 15's instruction task) the examples are instruction pairs
(benchmarks/common.py instruction_pairs: "Instruction: Finish the sentence. Input: <first half of a
synthetic sentence> Output:" and the second half as the completion, then end-of-text): twintune's
recipe gets `task: instruction` on their JSONL (the loss on the completion and end-of-text,
`mask_prompt`), the references the same rows with -100 labels on the prompt (TRL's completion-only
collator does the same). Every completion token needs the full-vocabulary logits; targets:
tokens/s >= 1.3x, peak RSS <= 0.8x against fair_loop. With --packed as well, the pairs are packed
(`task.packing`: whole examples fill rows of PACKED_LENGTH tokens, the loss still on each
completion) and the reference trains on the same packed rows with the same labels: --examples
then counts pairs, the epoch is all the packed rows.

Each runs in its own process (its own peak memory), on a random-weight GPT-Neo of the given
shape with the built-in tokenizer. Tokens/s counts real (non-padding) tokens. Every ratio is
ours / theirs; the targets (against fair_loop: tokens/s >= 1.5x, >= 2x for DoRA; peak RSS <= 0.8x)
are printed PASS/FAIL; for prompt, ptuning and prefix: tokens/s >= 1.2x, peak RSS <= 1.0x; adapter
and loreft have no target, their ratio to lora_equal is printed); the last line is one JSON object
with the ratios. Results go to
results/compare_torch_<shape>[_<method>][_quick][_compile].json (lora keeps the old name), with --head
results/compare_torch_<shape>_<method>_head[_quick][_compile].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    PACKED_LENGTH, check_targets, gemm_peak_gflops, instruction_task, method_training_flops, peak_rss_mb,
    print_epoch_table, reset_peak_rss, run_child, target_tokens, write_instruction_jsonl, write_result,
)

CACHE = Path(__file__).parent / ".cache"
LORA = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "lr": 2e-4, "batch": 8}
# Each method's recipe keys (the same settings the references get, see _reference_model)
METHODS = {
    "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": LORA["targets"]},
    "dora": {"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": LORA["targets"]},
    "ia3": {"target_modules": ["q_proj", "v_proj", "c_proj"], "feedforward_modules": ["c_proj"]},
    "bitfit": {},
    "last_blocks": {"n": 2},
    "full": {},
    "prompt": {"n": 20},
    "ptuning": {"n": 20, "encoder": "mlp"},
    "prefix": {"n": 20},
    "adapter": {"style": "houlsby", "reduction_factor": 16},
    "loreft": {"r": 4, "positions": "f1+l1"},
}
KINDS = ("twintune", "fair_loop", "trainer", "lora_equal")
WITHOUT_PEFT = ("adapter", "loreft")  # compared with twintune's LoRA of the same size (lora_equal)
SPEED_TARGET = {"dora": 2.0, "prompt": 1.2, "ptuning": 1.2, "prefix": 1.2}  # tokens/s vs the reference's; else 1.5
MEMORY_TARGET = {"prompt": 1.0, "ptuning": 1.0, "prefix": 1.0}  # peak RSS vs the reference's; else 0.8
WITH_HEAD = ("lora", "dora", "ia3", "bitfit", "last_blocks", "full")  # the methods --head takes
HEAD_TASK = 'task={"name": "classification", "head": "linear"}'


def model_dir(shape: str) -> Path:
    """A random-weight GPT-Neo of `shape` in Hugging Face layout with the built-in tokenizer (made once)."""
    from benchmarks.shapes import gpt_neo_config, random_model
    from twintune.formats.safetensors_io import write_safetensors
    from twintune.formats.tiny_model import builtin_model_dir

    target = CACHE / f"gpt-neo-{shape}-random"
    if (target / "model.safetensors").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    _, weights, _ = random_model(shape)
    config = dict(gpt_neo_config(shape), architectures=["GPTNeoForCausalLM"], tie_word_embeddings=True,
                  embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((builtin_model_dir("tiny-gpt-neo") / name).read_bytes())
    (target / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(target / "model.safetensors", weights, metadata={"format": "pt"})
    return target


def method_override(method: str) -> str:
    """The recipe override that sets `method` with the benchmark's settings (the whole mapping)."""
    return "method=" + json.dumps({"name": method, **METHODS[method]})


def equal_lora_override(shape: str, method: str) -> str:
    """twintune's LoRA on q_proj and v_proj at the rank whose trainable count is nearest the method's."""
    from twintune.formats.checkpoint import load_checkpoint
    from twintune.methods import BaseModel, method_from_dict
    from twintune.models import GPTNeoSpec

    spec = GPTNeoSpec.from_config(load_checkpoint(str(model_dir(shape))).config)
    count = method_from_dict({"name": method, **METHODS[method]}).plan(BaseModel(spec, _zeros(spec)), 0)
    per_rank = 2 * spec.num_layers * 2 * spec.hidden_size  # q and v in every block: A (r x d) and B (d x r)
    rank = max(1, round(count.trainable_parameters() / per_rank))
    return "method=" + json.dumps({"name": "lora", "r": rank, "alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]})


def _zeros(spec) -> dict:
    """Zero weights of the spec's shapes, read-only broadcasts (planning reads shapes, and embeddings for some inits)."""
    return {name: np.broadcast_to(np.zeros((), np.float32), shape) for name, shape in spec.weight_shapes().items()}




def recipe(shape: str, examples: int, compile: bool = False, method: str = "lora", equal_lora: bool = False,
           head: bool = False, instruction: bool = False, packed: bool = False):
    from twintune.recipe import load_recipe

    # train on `examples` sentences: the validation/test fractions take the rest of a larger set
    total = int(examples / 0.8) + 3
    task = []
    if instruction:
        source = write_instruction_jsonl(Path(tempfile.mkdtemp(prefix="instructions-")) / "pairs.jsonl", total)
        task = instruction_task(source, packed)
    return load_recipe("recipes/demo-financial-sentiment.yaml", [*task,
        f"model={model_dir(shape)}", f"data.synthetic_size={max(30, total)}", "train.epochs=1",
        f"train.batch_size={LORA['batch']}", f"train.lr={LORA['lr']}", "train.warmup_steps=0",
        equal_lora_override(shape, method) if equal_lora else method_override(method),
        "train.schedule=constant", "train.max_grad_norm=0", "train.group_by_length=true", f"train.compile={compile}",
        *([HEAD_TASK] if head else [])])


def child(kind: str, shape: str, examples: int, repeats: int, method: str = "lora", head: bool = False,
          instruction: bool = False, packed: bool = False) -> dict:
    import torch

    torch.manual_seed(0)
    from twintune.train.build import prepare
    from twintune.train.step import train_step

    from twintune.data.batching import TrainOrder

    run = prepare(recipe(shape, examples, compile=kind == "twintune_compiled", method=method,
                         equal_lora=kind == "lora_equal", head=head, instruction=instruction, packed=packed), "torch")
    encoded = run.splits["train"] if packed else run.splits["train"][:examples]  # packed: rows of the pairs
    # the references get plain dynamic padding (a random order); length grouping is ours
    plain = TrainOrder(encoded, LORA["batch"], 1, run.recipe.seed)
    batches = [b for step in range(plain.steps_per_epoch) for b in plain.step_batches(step)]
    real_tokens = sum(len(e.ids) for e in encoded)

    if kind.startswith("twintune") or kind == "lora_equal":
        def epoch():
            for step in range(run.order.steps_per_epoch):
                train_step(run, step)
        trainable = run.plan.trainable_parameters()
    else:
        epoch, trainable = _hf_epoch(kind, shape, encoded, batches, method, head)
    start = time.perf_counter()
    epoch()  # warm-up epoch: allocator, kernels and caches settle (and compiling, if any)
    warmup_seconds = time.perf_counter() - start
    times = []
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak_mb = peak_rss_mb()
    spec = run.spec
    flops = method_training_flops(run.plan, spec.linear_layers(), spec.hidden_size, spec.num_layers, spec.vocab_size,
                                  [len(e.ids) for e in encoded],
                                  target_tokens(encoded))
    peak_gflops = gemm_peak_gflops("torch")
    return {"kind": kind, "method": method, "head": head, "instruction": instruction, "packed": packed,
            "trainable_parameters": trainable, "shape": shape,
            "examples": len(encoded), "steps": len(batches),
            "real_tokens": real_tokens, "epoch_seconds": seconds, "epoch_times": times,
            "warmup_epoch_seconds": warmup_seconds,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "real_tokens_per_s": real_tokens / seconds, "peak_rss_mb": peak_mb,
            "useful_gflop_per_epoch": flops / 1e9, "achieved_gflops": flops / seconds / 1e9,
            "gemm_peak_gflops": peak_gflops, "mfu": flops / seconds / 1e9 / peak_gflops}


def _reference_model(shape: str, method: str, head: bool = False):
    """transformers' GPT-Neo with `method` as its users would set it up: PEFT's LoRA, DoRA, IA3, prompt
    tuning, P-tuning or prefix tuning, or (PEFT has no BitFit, last-blocks or full method)
    requires_grad on the same parameters. With `head`: GPTNeoForSequenceClassification (3 labels,
    the eos id as pad id) and PEFT's SEQ_CLS task, which trains `score` too."""
    if head:
        from transformers import AutoConfig, GPTNeoForSequenceClassification

        config = AutoConfig.from_pretrained(model_dir(shape))
        model = GPTNeoForSequenceClassification.from_pretrained(model_dir(shape), num_labels=3,
                                                                pad_token_id=config.eos_token_id)
    else:
        from transformers import GPTNeoForCausalLM

        model = GPTNeoForCausalLM.from_pretrained(model_dir(shape))
    task_type = "SEQ_CLS" if head else "CAUSAL_LM"
    keys = METHODS[method]
    if method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=keys["r"], lora_alpha=keys["alpha"], lora_dropout=0.0,
                                                target_modules=list(keys["target_modules"]),
                                                use_dora=method == "dora", task_type=task_type))
    if method == "ia3":
        from peft import IA3Config, get_peft_model

        return get_peft_model(model, IA3Config(target_modules=list(keys["target_modules"]),
                                               feedforward_modules=list(keys["feedforward_modules"]),
                                               task_type=task_type))
    if method in ("prompt", "ptuning", "prefix"):
        import peft

        config = {"prompt": peft.PromptTuningConfig, "ptuning": peft.PromptEncoderConfig,
                  "prefix": peft.PrefixTuningConfig}[method]
        return peft.get_peft_model(model, config(task_type="CAUSAL_LM", num_virtual_tokens=keys["n"]))
    first = model.config.num_layers - keys.get("n", 0)
    trains = {
        "bitfit": lambda name: name.endswith(".bias"),
        "last_blocks": lambda name: name.startswith("transformer.ln_f.") or (
            name.startswith("transformer.h.") and int(name.split(".")[2]) >= first),
        "full": lambda name: True,
    }[method]
    for name, parameter in model.named_parameters():  # the tied wte / lm_head weight is listed once
        parameter.requires_grad_(trains(name) or name == "score.weight")
    return model


def _hf_epoch(kind: str, shape: str, encoded, batches, method: str = "lora", head: bool = False):
    import torch

    model = _reference_model(shape, method, head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def example(e, width):
        ids = np.zeros(width, np.int64)
        ids[: len(e.ids)] = e.ids
        mask = np.zeros(width, np.int64)
        mask[: len(e.ids)] = 1
        labels = np.full(width, -100, np.int64)
        labels[e.prompt_len: len(e.ids)] = e.ids[e.prompt_len:]  # transformers shifts labels itself
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels)}

    if kind == "trainer":
        from transformers import Trainer, TrainingArguments, default_data_collator

        rows = [example(e, 128) for e in encoded]
        output = tempfile.mkdtemp(prefix="trainer-")
        arguments = TrainingArguments(output_dir=output, per_device_train_batch_size=LORA["batch"], num_train_epochs=1,
                                      learning_rate=LORA["lr"], lr_scheduler_type="constant", weight_decay=0.0,
                                      max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                                      disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=default_data_collator)
        return trainer.train, trainable

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA["lr"], weight_decay=0.0)
    model.train()

    def inputs(batch):
        """A dynamically padded Batch as transformers takes it: mask, and -100 except the label tokens."""
        ids = torch.from_numpy(batch.input_ids.astype(np.int64))
        mask = (torch.arange(ids.shape[1])[None, :] < torch.from_numpy(batch.lengths)[:, None]).long()
        if head:  # the prompt alone; the model pools its last non-pad token's 3 scores
            return {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(batch.labels.astype(np.int64))}
        labels = torch.full_like(ids, -100)
        labels.view(-1)[torch.from_numpy(batch.target_positions.astype(np.int64)) + 1] = torch.from_numpy(
            batch.targets.astype(np.int64))  # transformers shifts labels itself
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def epoch():
        for batch in batches:
            loss = model(**inputs(batch)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return epoch, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=list(METHODS), help="the method both sides train")
    parser.add_argument("--head", action="store_true",
                        help="with a linear classification head (task head linear; GPTNeoForSequenceClassification + "
                             "PEFT SEQ_CLS): " + ", ".join(WITH_HEAD))
    parser.add_argument("--instruction", action="store_true",
                        help="instruction pairs with multi-token completions (task instruction) instead of label words")
    parser.add_argument("--packed", action="store_true",
                        help=f"with --instruction: the pairs packed into rows of {PACKED_LENGTH} tokens, on both sides")
    parser.add_argument("--quick", action="store_true", help="125m shape, 40 examples, 3 repeats: under 5 minutes")
    parser.add_argument("--shape", default="125m")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time twintune with train.compile")
    parser.add_argument("--kinds", default=None,
                        help="which contenders, from " + ", ".join(KINDS) + " (default: twintune, fair_loop, trainer; "
                             "twintune and lora_equal for methods PEFT lacks); twintune and fair_loop give the targets")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results/*.json")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.quick:
        args.shape, args.examples, args.repeats = "125m", 40, 3
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.examples, args.repeats, args.method, args.head,
                               args.instruction, args.packed)))
        return
    if args.head and args.method not in WITH_HEAD:
        parser.error(f"--head: method {args.method} has no head reference; choose from {', '.join(WITH_HEAD)}")
    if args.packed and not args.instruction:
        parser.error("--packed packs instruction pairs; add --instruction")
    if args.head and args.instruction:
        parser.error("--head and --instruction are two different tasks; choose one")
    if args.head and "trainer" in (args.kinds or ""):
        parser.error("--head: the trainer kind is not built for the head task; use --kinds twintune,fair_loop")

    model_dir(args.shape)
    default = "twintune,lora_equal" if args.method in WITHOUT_PEFT else \
        "twintune,fair_loop" if args.head or args.instruction else "twintune,fair_loop,trainer"
    kinds = [k for k in (args.kinds or default).split(",") if k] + (["twintune_compiled"] if args.compile else [])
    unknown = sorted(set(kinds) - set(KINDS) - {"twintune_compiled"})
    if unknown or "twintune" not in kinds:
        parser.error(f"--kinds: choose from {', '.join(KINDS)}, twintune included (got {args.kinds!r})")
    rows = {}
    for kind in kinds:
        rows[kind] = run_child("benchmarks.compare_torch", ["--child", kind, "--shape", args.shape,
                                                            "--examples", str(args.examples),
                                                            "--repeats", str(args.repeats),
                                                            "--method", args.method,
                                                            *(["--head"] if args.head else []),
                                                            *(["--instruction"] if args.instruction else []),
                                                            *(["--packed"] if args.packed else [])], mlx=False)
        print(json.dumps(rows[kind]), flush=True)
    ours = rows["twintune"]
    ratios = {}
    for theirs in ("fair_loop", "trainer"):
        if theirs in rows:
            ratios[f"epoch_time_ratio_vs_{theirs}"] = ours["epoch_seconds"] / rows[theirs]["epoch_seconds"]
            ratios[f"tokens_per_s_ratio_vs_{theirs}"] = ours["real_tokens_per_s"] / rows[theirs]["real_tokens_per_s"]
    if "fair_loop" in rows:
        ratios["peak_memory_ratio"] = ours["peak_rss_mb"] / rows["fair_loop"]["peak_rss_mb"]
    if "trainer" in rows:
        ratios["peak_memory_ratio_vs_trainer"] = ours["peak_rss_mb"] / rows["trainer"]["peak_rss_mb"]
    if "lora_equal" in rows:
        ratios["tokens_per_s_ratio_vs_lora_equal"] = ours["real_tokens_per_s"] / rows["lora_equal"]["real_tokens_per_s"]
        ratios["peak_memory_ratio_vs_lora_equal"] = ours["peak_rss_mb"] / rows["lora_equal"]["peak_rss_mb"]
    if args.compile:
        ratios["compiled_epoch_time_ratio_vs_eager"] = rows["twintune_compiled"]["epoch_seconds"] / ours["epoch_seconds"]
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    print(f"GPT-Neo {args.shape} shape, method {args.method}{' + linear head' if args.head else ''}"
          f"{', task instruction' if args.instruction else ''}{' (packed)' if args.packed else ''} "
          f"({ours['trainable_parameters']:,} trainable), "
          f"{ours['examples']} examples ({ours['real_tokens']} real tokens), "
          f"batch {LORA['batch']}, median of {args.repeats} epochs after one warm-up")
    print_epoch_table(rows, "peak_rss_mb", "peak RSS MB")
    counts = {kind: row["trainable_parameters"] for kind, row in rows.items() if kind != "lora_equal"}
    if len(set(counts.values())) > 1:
        print(f"WARNING: the contenders train different numbers of parameters: {counts}")
    targets = {}
    if "fair_loop" in rows:
        speed = 1.3 if args.instruction else SPEED_TARGET.get(args.method, 1.5)
        targets = check_targets(ratios, {
            "tokens_per_s_ratio_vs_fair_loop": (">=", speed),
            "peak_memory_ratio": ("<=", MEMORY_TARGET.get(args.method, 0.8))})
    method = "" if args.method == "lora" else f"_{args.method}"  # lora keeps the old name
    method = f"_{args.method}_head" if args.head else method  # a head's file always names its method
    method = f"_{args.method}_instruction" if args.instruction else method
    method += "_packed" if args.packed else ""
    suffix = method + ("_quick" if args.quick else "") + ("_compile" if args.compile else "")
    if not args.no_save:
        path = write_result(f"compare_torch_{args.shape}{suffix}", {"method": args.method, "head": args.head,
                                                                     "instruction": args.instruction,
                                                                     "packed": args.packed,
                                                                     "rows": rows, "ratios": ratios,
                                                                     "targets": targets})
        print(f"wrote {path}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
