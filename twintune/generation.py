"""Text generation, the same on both backends: the decoding loop lives here, in numpy; a backend
only gives the next token's scores (`next_token_logits`), extending its key/value cache.

The prompt runs once and each new token alone after it (the cache holds every earlier position's
keys and values): no quadratic re-run of the prefix. Greedy decoding (temperature 0) takes the
highest score; sampling divides the scores by the temperature, keeps the smallest set of most
likely tokens whose probability reaches `top_p`, and draws from them with numpy's generator
seeded by `seed` — so both backends draw the same uniform numbers and choose the same tokens
wherever their probabilities agree. Decoding stops at the end-of-text token (not included in
the text), after `max_tokens`, or when prompt and continuation fill the model's context (as
transformers' max_length counts). A backend may decode greedily its own way (`greedy_tokens`: MLX
queues each forward pass before handing back the token before it, as mlx-lm does); it must choose
the tokens `choose_token` would (the first highest score).

Prompt and prefix methods work as in training: the virtual tokens (or prefix keys and values)
come first and enter the cache with the prompt; LoReFT edits the prompt's positions and not
the generated ones, as pyreft does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from twintune.backends.base import Backend
from twintune.errors import TwintuneError


@dataclass(frozen=True)
class Generation:
    """What `generate` gives: the new text, its token ids, why it stopped ("eos", "max_tokens" or
    "context"), the prompt's token count and the seconds the decoding took."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    seconds: float


def check_settings(max_tokens: int, temperature: float, top_p: float) -> None:
    """One sentence for a setting generation cannot use."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise TwintuneError(f"max_tokens must be a whole number of at least 1 (the tokens to generate), got {max_tokens!r}.")
    if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
        raise TwintuneError(f"temperature must be a number of at least 0 (0: greedy), got {temperature!r}.")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise TwintuneError(f"top_p must be a number above 0 and at most 1 (1: no cut), got {top_p!r}.")


def choose_token(scores: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> int:
    """The next token from one position's vocabulary scores: the best (temperature 0), or a draw.

    Example:
        >>> choose_token(np.array([0.1, 2.0, -1.0]), np.random.default_rng(0), 0.0, 1.0)
        1
    """
    if temperature == 0:
        return int(np.argmax(scores))
    scaled = scores.astype(np.float64) / temperature
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities, kind="stable")
    ranked = probabilities[order]
    keep = np.cumsum(ranked) - ranked < top_p  # the tokens before which the mass is still short of top_p
    kept = ranked[keep] / ranked[keep].sum()
    index = int(np.searchsorted(np.cumsum(kept), rng.random(), side="right"))
    return int(order[min(index, len(kept) - 1)])


def token_budget(prompt_tokens: int, context: int, virtual_tokens: int, max_tokens: int) -> int:
    """How many tokens may follow a prompt: max_tokens, or fewer where prompt and continuation would
    pass the model's positions (`virtual_tokens` of them a prompt or prefix method's); a prompt that
    leaves no room is refused in one sentence.

    Example:
        >>> token_budget(10, context=12, virtual_tokens=0, max_tokens=5)
        2
    """
    room = context - virtual_tokens - prompt_tokens
    if room < 1:
        raise TwintuneError(f"the prompt is {prompt_tokens} tokens" + (f" after {virtual_tokens} virtual tokens"
                            if virtual_tokens else "") + f", but the model reads at most {context} positions; "
                            "shorten it.")
    return min(max_tokens, room)


def generate_ids(backend: Backend, prompt_ids: list[int], *, context: int, virtual_tokens: int, eos_id: int,
                 max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> tuple[list[int], str]:
    """New token ids after `prompt_ids` and why decoding stopped; `context` is the model's positions,
    of which `virtual_tokens` go to a prompt or prefix method."""
    check_settings(max_tokens, temperature, top_p)
    budget = token_budget(len(prompt_ids), context, virtual_tokens, max_tokens)
    cache = backend.make_cache()
    if temperature == 0 and backend.capabilities.pipelined_greedy:  # the backend's own greedy decoding (MLX)
        tokens = backend.greedy_tokens(prompt_ids, cache, budget)
    else:
        tokens = sampled_tokens(backend, prompt_ids, cache, budget, np.random.default_rng(seed), temperature, top_p)
    new: list[int] = []
    for token in tokens:
        if token == eos_id:
            return new, "eos"
        new.append(token)
    return new, "max_tokens" if budget == max_tokens else "context"


def sampled_tokens(backend: Backend, prompt_ids: list[int], cache, count: int, rng: np.random.Generator, temperature: float,
                   top_p: float) -> Iterator[int]:
    """Up to `count` tokens, each chosen from the scores after the last (choose_token), the prompt run once
    and each token after it alone through the cache."""
    scores = backend.next_token_logits(np.array([prompt_ids], np.int32), cache)[0]
    for i in range(count):
        token = choose_token(scores, rng, temperature, top_p)
        yield token
        if i + 1 < count:
            scores = backend.next_token_logits(np.array([[token]], np.int32), cache)[0]


def generate_batch(backend: Backend, prompts: list[list[int]], *, context: int, virtual_tokens: int, eos_id: int,
                   max_tokens: int, temperature: float, top_p: float, seeds: list[int]) -> list[tuple[list[int], str]]:
    """generate_ids for several prompts of one length at once: one forward a token for all of them
    (a batch needs no padding when its rows are one length), each row's tokens drawn from its own
    generator seeded by its seed, as generate_ids draws them. A row that has ended is carried along
    (its tokens ignored) until every row has ended or the budget is spent.

    Example:
        >>> from twintune.recipe import load_recipe
        >>> from twintune.train.build import prepare
        >>> run = prepare(load_recipe("recipes/demo-financial-sentiment.yaml"), "torch", with_data=False)
        >>> [len(ids) <= 3 for ids, _ in generate_batch(run.backend, [[5, 6], [7, 8]], context=512, virtual_tokens=0,
        ...     eos_id=0, max_tokens=3, temperature=1.0, top_p=1.0, seeds=[1, 2])]
        [True, True]
    """
    check_settings(max_tokens, temperature, top_p)
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate_batch takes prompts of one length")
    budget = token_budget(len(prompts[0]), context, virtual_tokens, max_tokens)
    rngs = [np.random.default_rng(seed) for seed in seeds]
    new: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    cache = backend.make_cache()
    scores = backend.next_token_logits(np.array(prompts, np.int32), cache)
    for i in range(budget):
        tokens = []
        for row, rng in enumerate(rngs):
            token = eos_id if reasons[row] else choose_token(scores[row], rng, temperature, top_p)
            if not reasons[row]:
                if token == eos_id:
                    reasons[row] = "eos"
                else:
                    new[row].append(token)
            tokens.append(token)
        if all(reasons) or i + 1 == budget:
            break
        scores = backend.next_token_logits(np.array(tokens, np.int32)[:, None], cache)
    ended = "max_tokens" if budget == max_tokens else "context"
    return [(ids, reason or ended) for ids, reason in zip(new, reasons)]


def generate_text(backend: Backend, tokenizer, prompt: str, *, context: int, virtual_tokens: int, eos_id: int,
                  max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Generation:
    """`prompt` tokenized, continued (generate_ids) and the new tokens decoded. An empty prompt
    starts from the end-of-text token, as GPT-Neo's begin-of-text."""
    if not isinstance(prompt, str):
        raise TwintuneError(f"the prompt must be a string, got {type(prompt).__name__}.")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id]
    start = time.perf_counter()
    ids, reason = generate_ids(backend, prompt_ids, context=context, virtual_tokens=virtual_tokens, eos_id=eos_id,
                               max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return Generation(tokenizer.decode(ids), ids, reason, len(prompt_ids), time.perf_counter() - start)
