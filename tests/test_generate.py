"""Generation (twintune/generation.py): the key/value cache gives the full forward's scores, greedy
decoding writes the same tokens on both backends with every method (prompt and prefix methods
included), sampling is seeded, and decoding stops at end-of-text, max_tokens or the context's end."""

import subprocess
import sys

import numpy as np
import pytest

from twintune.api import generate, load
from twintune.backends.base import Capabilities
from twintune.errors import TwintuneError
from twintune.formats.tiny_model import write_tiny_model
from twintune.generation import choose_token, generate_ids
from twintune.recipe import load_recipe
from twintune.train.build import prepare

DEMO = "recipes/demo-financial-sentiment.yaml"
BACKENDS = ["mlx", "torch"]
PROMPT = [833, 375, 420, 319]  # "Operating profit rose by" in the built-in tokenizer
NEW = 12
NEVER = -1  # an end-of-text id no token has: decoding runs to max_tokens

METHODS = {
    "base": "{name: lora, r: 4, target_modules: [q_proj]}",  # LoRA's B starts at zero: the base model
    "lora": "{name: lora, r: 4, alpha: 8, target_modules: [q_proj, v_proj, c_fc]}",
    "dora": "{name: dora, r: 4, target_modules: [q_proj, v_proj]}",
    "ia3": "{name: ia3}",
    "bitfit": "{name: bitfit}",
    "last_blocks": "{name: last_blocks, n: 1}",
    "full": "{name: full}",
    "adapter": "{name: adapter, style: houlsby, reduction_factor: 8}",
    "prompt": "{name: prompt, n: 6, init: sample_vocab}",
    "ptuning": "{name: ptuning, n: 5, encoder: mlp, encoder_hidden_size: 16}",
    "prefix": "{name: prefix, n: 4, projection: true, encoder_hidden_size: 16}",
    "loreft": "{name: loreft, r: 2, layers: [0, 2], positions: f1+l2}",
}


def perturbed(state: dict, seed: int = 3) -> dict:
    """The start's values moved by half their own spread (0.3 where they start constant): values a
    trained adapter could have, so that the comparisons are not of a no-op."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.5 * (float(v.std()) or 0.6) * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in sorted(state.items())}


@pytest.fixture(scope="module")
def runs():
    """(method, backend) -> a run with the same perturbed trainable values on both backends."""
    made = {}

    def get(method, backend):
        if (method, backend) not in made:
            run = prepare(load_recipe(DEMO, [f"method={METHODS[method]}"]), backend, with_data=False)
            if method != "base":
                run.backend.set_trainable_state(perturbed(run.backend.trainable_state()))
            made[method, backend] = run
        return made[method, backend]

    return get


def greedy(run, prompt=PROMPT, new=NEW, **settings):
    return generate_ids(run.backend, prompt, context=run.spec.max_positions, virtual_tokens=run.method.virtual_tokens,
                        eos_id=settings.pop("eos_id", NEVER), max_tokens=new, **settings)


def step_scores(backend, ids: list[int], prompt_length: int) -> np.ndarray:
    """The scores after each position from the prompt's last on, computed through the cache."""
    cache = backend.make_cache()
    scores = [backend.next_token_logits(np.array([ids[:prompt_length]], np.int32), cache)[0]]
    scores += [backend.next_token_logits(np.array([[token]], np.int32), cache)[0] for token in ids[prompt_length:]]
    return np.stack(scores)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_the_cache_gives_the_full_forwards_scores_and_greedy_takes_the_best(method, backend, runs):
    run = runs(method, backend)
    new, reason = greedy(run)
    assert reason == "max_tokens" and len(new) == NEW
    ids = PROMPT + new
    # The full forward over prompt and continuation, the prompt marked as such (LoReFT edits its positions only)
    full = run.backend.logits(np.array([ids], np.int32), np.array([len(PROMPT)], np.int32))[0, len(PROMPT) - 1:]
    cached = step_scores(run.backend, ids, len(PROMPT))
    assert np.abs(cached - full).max() <= 1e-5 * np.abs(full).max()
    assert np.argmax(full[:-1], axis=-1).tolist() == new


@pytest.mark.parametrize("method", METHODS)
def test_greedy_decoding_writes_the_same_tokens_on_both_backends(method, runs):
    tokens = {backend: greedy(runs(method, backend))[0] for backend in BACKENDS}
    assert tokens["mlx"] == tokens["torch"]
    if method != "base":  # the perturbed values change the model's scores: the comparison is not of the base
        ids = PROMPT + tokens["torch"]
        scores, base = (step_scores(runs(m, "torch").backend, ids, len(PROMPT)) for m in (method, "base"))
        assert np.abs(scores - base).max() > 1e-2 * np.abs(base).max()


def test_loreft_edits_the_prompt_and_not_the_generated_tokens(runs):
    run = runs("loreft", "torch")
    ids = PROMPT + greedy(run)[0]
    as_prompt = run.backend.logits(np.array([ids], np.int32), np.array([len(ids)], np.int32))[0, len(PROMPT) - 1:]
    assert np.abs(step_scores(run.backend, ids, len(PROMPT)) - as_prompt).max() > 1e-3  # the last two would be edited


def test_sampling_is_seeded_and_the_same_on_both_backends(runs):
    settings = dict(temperature=0.9, top_p=0.95, new=16)
    sampled = {b: greedy(runs("lora", b), seed=1, **settings)[0] for b in BACKENDS}
    assert sampled["mlx"] == sampled["torch"]
    assert greedy(runs("lora", "torch"), seed=1, **settings)[0] == sampled["torch"]
    assert greedy(runs("lora", "torch"), seed=2, **settings)[0] != sampled["torch"]
    assert sampled["torch"] != greedy(runs("lora", "torch"), new=16)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_cache_follows_local_attention_windows_past_their_width(backend, tmp_path):
    model = write_tiny_model(tmp_path / "narrow", seed=1, window_size=4)
    run = prepare(load_recipe(DEMO, [f"model={model}", "method={name: prefix, n: 3}"]), backend, with_data=False)
    run.backend.set_trainable_state(perturbed(run.backend.trainable_state()))
    ids = PROMPT + greedy(run, new=10)[0]
    full = run.backend.logits(np.array([ids], np.int32))[0, len(PROMPT) - 1:]
    assert np.abs(step_scores(run.backend, ids, len(PROMPT)) - full).max() <= 1e-5 * np.abs(full).max()


class Scripted:
    """A backend whose scores pick the tokens of `script` in turn (then token 7 for ever)."""

    capabilities = Capabilities(launcher="none")  # decodes through next_token_logits alone

    def __init__(self, script, vocabulary=10):
        self.script, self.vocabulary, self.calls = list(script), vocabulary, []

    def make_cache(self):
        return []

    def next_token_logits(self, ids, cache):
        self.calls.append(ids.tolist())
        scores = np.zeros((1, self.vocabulary))
        scores[0, self.script.pop(0) if self.script else 7] = 5.0
        return scores


def test_decoding_stops_at_end_of_text_max_tokens_or_the_contexts_end():
    def run(script, **settings):
        backend = Scripted(script)
        options = dict(context=20, virtual_tokens=0, eos_id=0, max_tokens=10) | settings
        return generate_ids(backend, [4, 5, 6], **options), backend.calls

    (new, reason), calls = run([3, 2, 0, 9])
    assert (new, reason) == ([3, 2], "eos")
    assert calls == [[[4, 5, 6]], [[3]], [[2]]]  # the prompt once, then each new token alone
    assert run([3, 2, 1], max_tokens=2)[0] == ([3, 2], "max_tokens")
    assert run([3, 2, 1], context=5)[0] == ([3, 2], "context")  # 3 prompt + 2 new fill 5 positions
    assert run([3, 2, 1], context=7, virtual_tokens=2)[0] == ([3, 2], "context")
    with pytest.raises(TwintuneError, match="prompt is 3 tokens after 2 virtual tokens, but the model reads at most 4"):
        run([1], context=4, virtual_tokens=2)


def test_top_p_keeps_the_smallest_set_that_reaches_it_and_draws_by_probability():
    scores = np.log(np.array([0.2, 0.5, 0.3]))
    rng = np.random.default_rng(0)
    assert {choose_token(scores, rng, 1.0, 0.5) for _ in range(50)} == {1}
    draws = [choose_token(scores, rng, 1.0, 0.75) for _ in range(4000)]
    assert set(draws) == {1, 2}
    assert abs(draws.count(1) / 4000 - 0.5 / 0.8) < 0.03
    draws = [choose_token(scores, rng, 1.0, 1.0) for _ in range(4000)]
    assert abs(draws.count(0) / 4000 - 0.2) < 0.03
    assert choose_token(scores, rng, 0.0, 0.1) == 1


@pytest.mark.parametrize("settings, match", [
    (dict(max_tokens=0), "max_tokens must be a whole number of at least 1"),
    (dict(temperature=-1.0), "temperature must be a number of at least 0"),
    (dict(top_p=0.0), "top_p must be a number above 0 and at most 1"),
])
def test_bad_settings_are_one_sentence(settings, match):
    model = load("builtin:tiny-gpt-neo", backend="torch")
    with pytest.raises(TwintuneError, match=match):
        model.generate("Net sales", **settings)


def test_generate_from_a_run_directory_and_from_the_command_line(tmp_path):
    from twintune.train.loop import train

    recipe = load_recipe(DEMO, ["task=causal_lm", "data.synthetic_size=60", "data.max_length=32",
                                "train.batch_size=4", "train.max_steps=4", "method={name: prefix, n: 4}"])
    train(recipe, backend="torch", out_dir=str(tmp_path / "run"), progress=False)
    out = generate(tmp_path / "run", "Operating profit", backend="mlx", max_tokens=6)
    assert out.finish_reason in ("eos", "max_tokens") and out.prompt_tokens == 2
    again = load(None, adapter=tmp_path / "run", backend="torch").generate("Operating profit", max_tokens=6)
    assert again.token_ids == out.token_ids  # saved on torch, read on MLX: the same tokens
    result = subprocess.run([sys.executable, "-m", "twintune", "generate", str(tmp_path / "run"), "Operating profit",
                             "--max-tokens", "6", "--backend", "torch"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Operating profit" + out.text + "\n"
    assert "stopped:" in result.stderr


@pytest.mark.parametrize("method", ["base", "prefix", "loreft"])
def test_mlxs_pipelined_greedy_decoding_chooses_what_the_numpy_loop_chooses_and_stops_alike(method, runs):
    from twintune.generation import sampled_tokens

    run = runs(method, "mlx")
    assert hasattr(run.backend, "greedy_tokens")  # MLX decodes greedily its own way
    piped = list(run.backend.greedy_tokens(PROMPT, run.backend.make_cache(), NEW))
    plain = list(sampled_tokens(run.backend, PROMPT, run.backend.make_cache(), NEW, np.random.default_rng(0), 0.0, 1.0))
    assert piped == plain
    stop = piped[2]  # as if the third token were end-of-text: both backends stop there, before it
    for backend in BACKENDS:
        assert greedy(runs(method, backend), eos_id=stop) == (piped[:piped.index(stop)], "eos")


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_prompts_sampled_together_draw_what_each_draws_alone(backend):
    """generate_batch (GRPO's and PPO's sampling): rows of one length in one forward, each from its own
    seeded generator; in float64 the batch's scores round as each row's alone, so the tokens are the same."""
    from twintune.generation import generate_batch

    run = prepare(load_recipe(DEMO, ["dtype=float64"]), backend, with_data=False)
    run.backend.set_trainable_state(perturbed(run.backend.trainable_state()))
    prompts, seeds = [[5, 6, 7], [8, 9, 10], [5, 6, 7]], [11, 12, 13]
    options = dict(context=512, virtual_tokens=0, eos_id=0, max_tokens=12, temperature=1.0, top_p=0.9)
    together = generate_batch(run.backend, prompts, seeds=seeds, **options)
    alone = [generate_ids(run.backend, p, seed=s, **options) for p, s in zip(prompts, seeds)]
    assert together == alone and together[0] != together[2]  # one prompt, two seeds: two draws
