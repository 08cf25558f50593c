"""The public entry points, for use from Python.

Train a recipe (here 4 steps of the demo):
    >>> from twintune.api import load_recipe, train
    >>> recipe = load_recipe("recipes/demo-financial-sentiment.yaml", ["train.max_steps=4"])
    >>> summary = train(recipe, backend="mlx", out_dir="runs/api-demo", progress=False)
    >>> summary["steps"], summary["out_dir"]
    (4, 'runs/api-demo')

Use trained adapters (any method; twintune's or PEFT's), several on one loaded base:
    >>> from twintune.api import load
    >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo", backend="torch")
    >>> model.predict(["Operating profit rose to EUR 13.1 mn ."])[0]["label"] in ("negative", "neutral", "positive")
    True
    >>> model.add_adapter("bitfit", "runs/demo-bitfit")
    >>> model.set_adapter("bitfit")          # the base is not read again
    >>> model.logits([[833, 375, 420]]).shape
    (1, 3, 1024)
    >>> model.set_adapter(None)               # the base model itself

Generate text (greedy: the same tokens on both backends; any method, prompt and prefix methods too):
    >>> from twintune.api import generate
    >>> generate("runs/demo-causal-lm", "Operating profit", max_tokens=8).finish_reason
    'max_tokens'
    >>> len(model.generate("Net sales", max_tokens=4, temperature=0.8, top_p=0.9, seed=1).token_ids) <= 4
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from twintune.backends.base import Backend
from twintune.data.batching import Encoder, Prompt
from twintune.data.chat import read_chat_template, render
from twintune.data.documents import eos_id
from twintune.errors import TwintuneError
from twintune.formats.adapter import check_adapter_fits, check_adapter_method, load_adapter
from twintune.formats.checkpoint import load_checkpoint
from twintune.generation import Generation, generate_text
from twintune.methods import BaseModel, Method, Plan
from twintune.recipe import DTYPES, PromptConfig, Recipe, load_recipe
from twintune.formats.head import read_head_labels
from twintune.tasks import HEAD, check_head_labels, head_surgery, with_head
from twintune.tasks.ppo import split_value_head
from twintune.train.build import open_base, prepare
from twintune.train.evaluate import evaluate, label_scores, labelled_texts, predict
from twintune.train.loop import train
from twintune.train.runs import check_finished, run_backend

__all__ = ["load_checkpoint", "load_recipe", "prepare", "train", "evaluate", "predict", "load", "generate", "Model",
           "Adapter", "Generation"]

Labels = Mapping[str, str] | Sequence[str]


@dataclass
class Adapter:
    """One adapter held by a Model: its method, the plan that puts it on the base, its trained
    values (as the backends name them), the prompt its predictions use, and where it was read."""

    method: Method
    plan: Plan
    state: dict[str, np.ndarray]
    prompt: Prompt
    directory: Path


def load(model: str | None, adapter: str | Path | None = None, backend: str = "auto", labels: Labels | None = None,
         template: str | None = None, dtype: str | None = None) -> "Model":
    """A base model on a backend, with an adapter (named "default") active if one is given.

    `model` is a model directory, "builtin:tiny-gpt-neo" or a Hugging Face hub id (None: the
    run's own recipe.model). `adapter` is a twintune run directory, a run's adapter/ directory,
    or an adapter saved by PEFT (of any method twintune has in PEFT's layout). A run's recipe.json decides the prompt (unless
    `labels`/`template` are given), the dtype (unless `dtype` is) and the base's quantization, so
    the logits are the run's. Otherwise the base is float32 (`dtype="float64"`: the CPU proof
    mode), unquantized. `backend`: "mlx", "torch" or "auto" (a run's adapter: the backend that
    trained it; otherwise MLX on Apple Silicon, else torch).
    `labels` maps each label to its verbalizer word ({"negative": " negative", ...}); a list of
    labels means the words " label".

    Example:
        >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo/adapter", backend="mlx")
        >>> model.active, model.adapters
        ('default', ['default'])
    """
    directory, run_recipe = locate_adapter(adapter) if adapter is not None else (None, None)
    if model is None and run_recipe is None:
        raise TwintuneError("name the base model (a directory, builtin:tiny-gpt-neo or a hub id); only a run "
                            "directory's adapter knows its own.")
    recipe = run_recipe or Recipe()
    if run_recipe is not None:  # a run reopens on the backend that trained it, unless told otherwise
        backend = run_backend(directory.parent, backend) or "auto"
    settings = dataclasses.replace(recipe, model=model or recipe.model, dtype=dtype or recipe.dtype)
    if settings.dtype not in DTYPES:
        raise TwintuneError(f"dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}.")
    opened = open_base(settings, backend)
    loaded = Model(opened.backend, opened.base, opened.tokenizer, opened.max_positions, prompt_settings(labels, template),
                   chat=read_chat_template(opened.directory, recipe.data.chat_template))
    if directory is not None:
        loaded.add_adapter("default", adapter)
        loaded.set_adapter("default")
    return loaded


class Model:
    """A base model on a backend with named adapters, switched without reading the base again.

    Example:
        >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo", backend="torch")
        >>> model.add_adapter("ia3", "runs/demo-ia3")
        >>> model.set_adapter("ia3"); model.active
        'ia3'
        >>> model.logits(np.array([[833, 375]])).shape   # (batch, tokens, vocabulary)
        (1, 2, 1024)
    """

    def __init__(self, backend: Backend, base: BaseModel, tokenizer, max_length: int, prompt: dict | None = None,
                 chat: dict | None = None):
        self.backend = backend
        self.base = base
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.chat = chat  # the chat template generate(chat=True) renders with: the run's data.chat_template or the tokenizer's
        self._prompt = prompt or {}  # load()'s own labels/template, which every adapter's prompt yields to
        self._adapters: dict[str, Adapter] = {}
        self.active: str | None = None

    def __repr__(self) -> str:
        return f"Model(backend={self.backend.name!r}, adapters={self.adapters!r}, active={self.active!r})"

    @property
    def adapters(self) -> list[str]:
        """The adapters' names, in the order they were added."""
        return list(self._adapters)

    @property
    def prompt(self) -> Prompt:
        """The prompt `predict` uses: the active adapter's (the defaults or load()'s with none active)."""
        if self.active is not None:
            return self._adapters[self.active].prompt
        return make_prompt(self._prompt, None)

    def add_adapter(self, name: str, directory: str | Path, labels: Labels | None = None,
                    template: str | None = None) -> None:
        """Read an adapter (run directory, adapter/ directory or PEFT adapter) and keep it under `name`;
        the active adapter stays active.

        Example:
            >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo", backend="torch")
            >>> model.add_adapter("bitfit", "runs/demo-bitfit"); model.adapters
            ['default', 'bitfit']
        """
        if not isinstance(name, str) or not name:
            raise TwintuneError(f"an adapter's name must be a non-empty string, got {name!r}.")
        if name in self._adapters:
            raise TwintuneError(f"there is already an adapter named {name!r}; choose another name "
                                f"(adapters: {', '.join(self._adapters)}).")
        self._adapters[name] = self._read(Path(directory), {**self._prompt, **prompt_settings(labels, template)})

    def set_adapter(self, name: str | None) -> None:
        """Make the adapter `name` active (None: the base model itself): the active plan is taken off
        the model, the new one put on, and its trained values set. The base is not read again.

        Example:
            >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo", backend="torch")
            >>> model.add_adapter("bitfit", "runs/demo-bitfit")
            >>> model.set_adapter("bitfit"); model.set_adapter(None); model.active is None
            True
        """
        if name is not None and name not in self._adapters:
            known = ", ".join(repr(n) for n in self._adapters) or "none yet"
            raise TwintuneError(f"there is no adapter named {name!r}; adapters: {known} (or None for the base model).")
        if name == self.active:
            return
        if self.active is not None:
            self.backend.undo_method(self._adapters[self.active].plan, self.base)
            self.active = None
        if name is not None:
            adapter = self._adapters[name]
            self.backend.apply_method(adapter.plan)
            self.backend.set_trainable_state(adapter.state)
            self.active = name

    def logits(self, input_ids) -> np.ndarray:
        """Next-token logits (batch, tokens, vocabulary) for token ids (batch, tokens) or one row
        (tokens,): float32, float64 on a float64 base. With an adapter that has a classification head
        active: its class scores at every position (batch, tokens, labels), as transformers'
        GPTNeoForSequenceClassification computes before it picks the last token.

        Example:
            >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo", backend="torch")
            >>> model.logits([[833, 375, 420]]).shape
            (1, 3, 1024)
        """
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise TwintuneError(f"input_ids must be integer token ids of shape (batch, tokens), got {ids.dtype} "
                                f"of shape {ids.shape}.")
        vocabulary = self.base.spec.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocabulary):
            raise TwintuneError(f"input_ids must be token ids from 0 to {vocabulary - 1} (the model's vocabulary), "
                                f"got ids from {ids.min()} to {ids.max()}.")
        return self.backend.logits(ids.astype(np.int32))

    def predict(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[dict]:
        """Label and class probabilities for each text, in order: the softmax over the label words'
        first-token scores after the prompt (the active adapter's prompt, see `prompt`), or with a
        classification head, over its class scores at the prompt's last token.

        Example:
            >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo", backend="torch")
            >>> sorted(model.predict(["Operating profit rose to EUR 13.1 mn ."])[0]["probabilities"])
            ['negative', 'neutral', 'positive']
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise TwintuneError("give at least one text to predict.")
        active = self._adapters.get(self.active)
        encoder = Encoder(self.tokenizer, self.prompt, self.max_length, method=active and active.method,
                          context=self.base.spec.max_positions, head=bool(active and HEAD in active.state))
        labels = encoder.prompt.labels
        encoded = [encoder.encode(text, labels[0], f" (text {i + 1})") for i, text in enumerate(texts)]
        return labelled_texts(texts, label_scores(self.backend, encoded, encoder.first_label_ids, batch_size), labels)

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False, system: str | None = None) -> Generation:
        """The text the model (with the active adapter) writes after `prompt`: greedy at temperature 0,
        otherwise sampled (top-p, seeded); it stops at end-of-text, after `max_tokens` or at the
        context's end (`finish_reason`). A key/value cache runs each new token alone. With `chat`, the
        prompt is a user's message, rendered with the chat template the run trained with (its
        data.chat_template, or the tokenizer's) and the assistant's generation prompt, after `system`'s
        message where one is given.

        Example:
            >>> model = load("builtin:tiny-gpt-neo", adapter="runs/demo-causal-lm", backend="torch")
            >>> out = model.generate("Operating profit", max_tokens=5)
            >>> out.finish_reason, len(out.token_ids) <= 5
            ('max_tokens', True)
        """
        active = self._adapters.get(self.active)
        if active is not None and HEAD in active.state:
            raise TwintuneError(f"adapter {self.active!r} ({active.directory}) has a classification head: it scores "
                                "classes, not next tokens; generate with a run trained without a head, or with the base "
                                "model.")
        if chat:
            if self.chat is None:
                raise TwintuneError("--chat renders the prompt with a chat template, and this model has none (GPT-Neo's "
                                    "tokenizer has none): train with data.chat_template, or generate without --chat.")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt = render(messages, self.chat, add_generation_prompt=True)
        return generate_text(self.backend, self.tokenizer, prompt, context=self.base.spec.max_positions,
                             virtual_tokens=active.method.virtual_tokens if active else 0,
                             eos_id=eos_id(self.tokenizer), max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, seed=seed)

    def _read(self, directory: Path, prompt: dict) -> Adapter:
        """An adapter read, checked against this base, and planned (the plan's initial values are
        overwritten by the trained ones, so its seed does not matter)."""
        adapter_dir, recipe = locate_adapter(directory)
        if recipe is not None:
            check_same_base(recipe, self.base, directory)
        method, state = load_adapter(adapter_dir, self.base.spec)
        state, _ = split_value_head(state)  # a PPO run's value head: the model generates without it
        if recipe is not None:
            check_adapter_method(method, recipe.method, adapter_dir)
        plan = method.plan(self.base, seed=0)
        head = state.get(HEAD)
        if head is not None:  # the head's own labels, unless the caller named them
            saved = read_head_labels(adapter_dir)
            if saved is not None and "labels" not in prompt and recipe is None:
                prompt = {**prompt, "labels": {label: f" {label}" for label in saved}}
            elif recipe is not None and "labels" not in prompt:  # a reward model's one row, `reward`
                wanted = recipe.task.head_labels(recipe)
                if wanted != list(recipe.prompt.labels):
                    prompt = {**prompt, "labels": {label: f" {label}" for label in wanted}}
            prompt_now = make_prompt(prompt, recipe)
            check_head_labels(head, saved, prompt_now.labels, adapter_dir)
            plan = with_head(plan, head_surgery(head.shape[0], self.base.spec.hidden_size, seed=0))
        check_adapter_fits(state, {k: v.shape for k, v in plan.initial_values().items()}, method, adapter_dir)
        return Adapter(method, plan, state, make_prompt(prompt, recipe), adapter_dir)


def generate(target: str | Path, prompt: str, backend: str = "auto", max_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False, system: str | None = None) -> Generation:
    """Load `target` — a run directory (its base with its trained adapter) or a model (a directory,
    "builtin:tiny-gpt-neo" or a hub id) — and continue `prompt` (Model.generate).

    Example:
        >>> generate("builtin:tiny-gpt-neo", "Net sales rose", max_tokens=6, backend="torch").prompt_tokens
        3
    """
    is_run = Path(target).is_dir() and (Path(target) / "recipe.json").exists()
    model = load(None, adapter=target, backend=backend) if is_run else load(str(target), backend=backend)
    return model.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=chat,
                          system=system)


# --- helpers ---------------------------------------------------------------------------------------

def locate_adapter(directory: str | Path) -> tuple[Path, Recipe | None]:
    """The adapter directory a path names, and its run's recipe (None for an adapter outside a run):
    a run directory holds recipe.json and adapter/; a run's adapter/ has recipe.json beside it."""
    path = Path(directory)
    if (path / "recipe.json").is_file():
        recipe = load_recipe(path / "recipe.json")
        if not recipe.task.trains_in_steps:
            raise TwintuneError(f"{path} is a {recipe.task.name} run: it holds a classifier on frozen features, not an "
                                "adapter; use twintune eval / predict on it (twintune.train.runs.open_run from Python).")
        check_finished(path)
        return path / "adapter", recipe
    if (path / "adapter_config.json").is_file() and (path.parent / "recipe.json").is_file():
        return path, load_recipe(path.parent / "recipe.json")
    return path, None


def check_same_base(recipe: Recipe, base: BaseModel, where: Path) -> None:
    """A run's adapter goes only on a base quantized as the run's was (else its logits are not the run's)."""
    if recipe.quantization() != base.quantization:
        def kind(q):
            return q.type if q else "none"
        raise TwintuneError(f"the run in {where} was trained on a base with quantize.type "
                            f"{kind(recipe.quantization())!r} (settings included), but this model's base has "
                            f"{kind(base.quantization)!r}; load that run on its own with twintune.api.load.")


def prompt_settings(labels: Labels | None, template: str | None) -> dict:
    """The prompt keys a caller gave (labels as {label: word}; a list of labels means words " label")."""
    given = {}
    if labels is not None:
        if isinstance(labels, str) or not labels:
            raise TwintuneError(f"labels must be a non-empty mapping of label to word, or a list of labels; "
                                f"got {labels!r}.")
        given["labels"] = dict(labels) if isinstance(labels, Mapping) else {str(label): f" {label}" for label in labels}
    if template is not None:
        given["template"] = template
    return given


def make_prompt(given: dict, recipe: Recipe | None) -> Prompt:
    """The prompt from the keys given, else the run's recipe, else the recipe defaults."""
    defaults = recipe.prompt if recipe is not None else PromptConfig()
    return Prompt(given.get("template", defaults.template), dict(given.get("labels", defaults.labels)))
