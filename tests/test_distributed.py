"""Two processes equal one: torchrun (gloo) and mlx.launch (ring), both on 127.0.0.1.

The same recipe and global batch on 2 processes and on 1 give the same per-step losses (1e-5
relative) and the same trained values (1e-5 of their scale); so does full fine-tuning sharded by
FSDP2 (train.fsdp); a 2-process checkpoint resumes on 1 process (and a 1-process one on 2, a sharded
one on MLX) to the uninterrupted run's values; bad launches are one sentence.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from twintune.data.batching import make_batch
from twintune.formats.safetensors_io import read_safetensors
from twintune.train.distributed import World, share, share_bounds

DEMO = "recipes/demo-financial-sentiment.yaml"
# lr 1e-3, not the demo's 4e-3: at 4e-3 AdamW turns float32's different order of additions (the
# all-reduce sums two halves) into 1.8e-5 of scale in one LoRA value after 10 steps; in float64 (lora64)
# the two agree to 1e-13, so that is rounding, not a difference of method
SMALL = ["train.max_steps=10", "data.synthetic_size=120", "train.batch_size=8", "train.warmup_steps=2",
         "train.save_every=5", "train.keep_last=2", "train.eval_every=5", "train.lr=1e-3"]
# LoRA with dropout: each process draws one process's masks for its rows (twintune/dropout.py)
METHODS = {"lora": "method={name: lora, r: 4, dropout: 0.1, target_modules: [q_proj, v_proj, c_fc]}",
           "prefix": "method={name: prefix, n: 4}",
           "lora64": "method={name: lora, r: 4, dropout: 0.1, target_modules: [q_proj, v_proj, c_fc]}"}  # in float64
# Full fine-tuning for FSDP2 (train.fsdp, torch): full64 in float64 with 1-row micro-batches
# (grad_accum 8), so one process has no share of any micro-batch and runs its zero-weighted row
FULL = {"full": 'method={"name": "full"}', "full64": 'method={"name": "full"}'}
FULL64 = ["train.grad_accum=8"]
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _train(out, backend, method, nproc=None, extra=(), resume=None):
    argv = [sys.executable, "-m", "twintune", "train", DEMO, "--backend", backend, "--out", str(out), "--no-progress",
            "--set", {**METHODS, **FULL}[method], *[a for item in [*SMALL, *extra] for a in ("--set", item)],
            *(["--set", "dtype=float64"] if method.endswith("64") else []),
            *(["--nproc", str(nproc)] if nproc else []), *(["--resume", str(resume)] if resume else [])]
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(out):
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return np.array([line["loss"] for line in lines if "loss" in line]), lines


def _values(out):  # the adapter's values, and a head's saved beside them (PPO's value head)
    return {k: v for path in sorted((out / "adapter").glob("*.safetensors")) for k, v in read_safetensors(path).items()}


def _close(a, b, what, tolerance=1e-5):
    for name in a:
        scale = max(np.abs(b[name]).max(), 1e-12)
        assert np.abs(a[name] - b[name]).max() / scale < tolerance, (what, name)


def _close_within_rounding(a, b, exact, what, tolerance=1e-5):
    """Each float32 tensor of two processes (a) within `tolerance` of one process's (b), or, where
    float32's own rounding carries one process further than that from the exact arithmetic (`exact`:
    the same run in float64), no further from it than twice that rounding: the project's float32
    standard (docs/parity.md). Measured on an AVX-512 CPU: one LoRA B tensor at 1.26e-5 of scale
    across processes, its one-process float32 run 1.62e-5 from float64."""
    for name in a:
        scale = max(np.abs(exact[name]).max(), 1e-12)
        own = np.abs(b[name] - exact[name]).max() / scale
        assert np.abs(a[name] - b[name]).max() / scale < max(tolerance, 2 * own), (what, name, own)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    done = {}
    for backend in ("torch", "mlx"):
        for method in METHODS:
            for nproc in (None, 2):
                out = root / f"{backend}-{method}-{nproc or 1}"
                _train(out, backend, method, nproc)
                done[backend, method, nproc or 1] = out
    return root, done


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_give_one_process_steps(runs, backend, method):
    _, done = runs
    one, two = done[backend, method, 1], done[backend, method, 2]
    (loss_one, lines_one), (loss_two, lines_two) = _losses(one), _losses(two)
    tolerance = 1e-9 if method == "lora64" else 1e-5  # float64: only the order of additions differs
    assert len(loss_one) == len(loss_two) == 10
    assert np.abs(loss_two - loss_one).max() / np.abs(loss_one).max() < tolerance, (loss_one, loss_two)
    if method == "lora":  # float32, with its float64 twin (lora64) as the exact arithmetic
        _close_within_rounding(_values(two), _values(one), _values(done[backend, "lora64", 1]), "trained values")
    else:
        _close(_values(two), _values(one), "trained values", tolerance)
    evals = [(a["val_accuracy"], b["val_accuracy"]) for a, b in zip(lines_one, lines_two) if "val_accuracy" in a]
    assert evals and all(a == b for a, b in evals)  # the evaluation is split and gathered: the same report
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == {"torch": "torchrun", "mlx": "mlx.launch"}[backend]
    steps = [line for line in lines_two if "loss" in line]
    assert all(sum(line["rank_examples"]) == 8 and len(line["rank_examples"]) == 2 for line in steps)


PREFERENCE_TASKS = {"preference": "{name: preference}", "kto": "{name: kto}",
                    "grpo": "{name: grpo, reward: 'python:twintune.rewards.upbeat', max_new_tokens: 4}",
                    "ppo": "{name: ppo, reward: 'python:twintune.rewards.upbeat', max_new_tokens: 4, num_ppo_epochs: 2}"}


@pytest.mark.parametrize("task", list(PREFERENCE_TASKS))
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_two_processes_give_one_process_preference_steps(tmp_path, backend, task):
    """Pairs (GRPO's groups) are never split between processes and the loss is over the step's global
    pairs, rows or completion tokens (KTO's z0, GRPO's samples and PPO's rollouts taken on the whole
    micro-batch on every process): float64, the same steps and figures to 1e-9."""
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, None), (two, 2)):
        _train(out, backend, "lora64", nproc, extra=[f"task={PREFERENCE_TASKS[task]}"])
    (loss_one, lines_one), (loss_two, lines_two) = _losses(one), _losses(two)
    # (absolute where the loss is near 0: GRPO's is a sum of advantages that cancel, about 1e-17)
    assert len(loss_one) == 10 and np.abs(loss_two - loss_one).max() < 1e-9 * max(1.0, np.abs(loss_one).max())
    for a, b in zip(lines_one, lines_two):
        for name in ("rewards/margins", "logps/chosen", "val_rewards/margins", "val_loss", "reward", "val_reward",
                     "objective/scores", "loss/value_avg", "val_objective/scores"):
            if name in a:
                assert abs(a[name] - b[name]) <= 1e-9 * max(1.0, abs(a[name])), name
    steps = [line for line in lines_two if "loss" in line]
    assert all(line["rank_examples"] == [4, 4] for line in steps)  # 8 pairs (rows, prompts' groups), 4 a process
    _close(_values(two), _values(one), "trained values", 1e-9)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_checkpoint_resumes_with_another_number_of_processes(runs, backend):
    root, done = runs
    for written_by, resumed_on in ((2, None), (1, 2)):  # 2 processes -> 1, and 1 -> 2
        checkpoint = done[backend, "lora", written_by] / "checkpoints" / "step-00000005"
        out = root / f"{backend}-resumed-{written_by}-on-{resumed_on or 1}"
        _train(out, backend, "lora", resumed_on, resume=checkpoint)
        loss_resumed, _ = _losses(out)
        loss_whole, _ = _losses(done[backend, "lora", 1])
        assert np.abs(loss_resumed - loss_whole).max() / np.abs(loss_whole).max() < 1e-5
        _close_within_rounding(_values(out), _values(done[backend, "lora", 1]), _values(done[backend, "lora64", 1]),
                               f"resumed {written_by} -> {resumed_on or 1}")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    done = {}
    for method in FULL:
        extra = FULL64 if method == "full64" else []
        done[method, 1] = root / f"{method}-1"
        _train(done[method, 1], "torch", method, None, extra)
        done[method, 2] = root / f"{method}-fsdp-2"
        _train(done[method, 2], "torch", method, 2, [*extra, "train.fsdp=true"])
    return root, done


@pytest.mark.parametrize("method", list(FULL))
def test_fsdp_full_fine_tuning_equals_one_process(fsdp_runs, method):
    _, done = fsdp_runs
    one, two = done[method, 1], done[method, 2]
    (loss_one, lines_one), (loss_two, lines_two) = _losses(one), _losses(two)
    tolerance = 1e-9 if method == "full64" else 1e-5  # measured: 2e-16 and 3e-15 of scale in float64
    assert len(loss_one) == len(loss_two) == 10
    assert np.abs(loss_two - loss_one).max() / np.abs(loss_one).max() < tolerance, (loss_one, loss_two)
    norms_one, norms_two = ([line["grad_norm"] for line in lines if "loss" in line] for lines in (lines_one, lines_two))
    np.testing.assert_allclose(norms_two, norms_one, rtol=tolerance)  # the global norm, from the shards' parts
    values_one, values_two = _values(one), _values(two)
    assert len(values_one) > 50 and values_one.keys() == values_two.keys()  # every weight of the model, gathered
    _close(values_two, values_one, "trained weights", tolerance)
    evals = [(a["val_accuracy"], b["val_accuracy"]) for a, b in zip(lines_one, lines_two) if "val_accuracy" in a]
    assert evals and all(a == b for a, b in evals)  # 1 evaluation batch: one process runs it, the other none
    summaries = [json.loads((out / "summary.json").read_text()) for out in (one, two)]
    assert [(s["world_size"], s["fsdp"]) for s in summaries] == [(1, False), (2, True)]


def test_an_fsdp_checkpoint_resumes_on_one_process_on_mlx_and_back(fsdp_runs):
    root, done = fsdp_runs
    whole = done["full64", 1]
    loss_whole, _ = _losses(whole)
    for label, checkpoint_of, backend, nproc, extra in (
            ("fsdp-2-on-1", done["full64", 2], "torch", None, ["train.fsdp=true"]),  # one process: nothing to shard
            ("fsdp-2-on-mlx", done["full64", 2], "mlx", None, []),  # train.fsdp is how, not what: may go
            ("1-on-fsdp-2", whole, "torch", 2, ["train.fsdp=true"])):
        out = root / f"full64-resumed-{label}"
        _train(out, backend, "full64", nproc, [*FULL64, *extra], resume=checkpoint_of / "checkpoints" / "step-00000005")
        loss_resumed, _ = _losses(out)
        assert np.abs(loss_resumed - loss_whole).max() / np.abs(loss_whole).max() < 1e-9, label
        _close(_values(out), _values(whole), label, 1e-9)


def test_shares_cover_every_row_once_and_equal_make_batch():
    from twintune.data.batching import Encoded

    rows = [Encoded(ids=list(range(1, 4 + k)), prompt_len=2 + k % 2, label=k % 3, class_target=True) for k in range(7)]
    batch = make_batch(rows)
    for size in (1, 2, 3, 8):
        bounds = share_bounds(7, World(0, size))
        assert bounds[0] == 0 and bounds[-1] == 7 and max(np.diff(bounds)) - min(np.diff(bounds)) <= 1
        for rank in range(size):
            part = share(batch, World(rank, size))
            mine = rows[bounds[rank]:bounds[rank + 1]]
            if not mine:
                assert part is None
                continue
            expected = make_batch(mine)
            for field in ("input_ids", "target_positions", "targets", "answer_positions", "labels", "lengths"):
                np.testing.assert_array_equal(getattr(part, field), getattr(expected, field), err_msg=field)


def _sentence(env, *argv, timeout=120):
    result = subprocess.run([sys.executable, "-m", "twintune", "train", DEMO, "--no-progress", *argv],
                            capture_output=True, text=True, env={**ENV, **env}, timeout=timeout)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("twintune: error: ")]
    assert errors and "Traceback" not in result.stderr, result.stderr[-2000:]
    return errors[0]


def test_a_global_batch_that_does_not_divide_is_one_sentence(tmp_path):
    sentence = _sentence({"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
                         "--backend", "torch", "--out", str(tmp_path / "r"), "--set", "train.batch_size=8")
    assert "train.batch_size 8 (the global batch) does not divide among 3 processes" in sentence


def test_a_process_that_finds_itself_alone_is_one_sentence(tmp_path):
    from twintune.train.distributed import free_port

    sentence = _sentence({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                          "TWINTUNE_JOIN_TIMEOUT": "5"}, "--backend", "torch", "--out", str(tmp_path / "r"),
                         *[a for item in SMALL for a in ("--set", item)])
    assert "waited 5 s for the other 1 process to join" in sentence


def test_a_rank_that_fails_ends_the_run_with_its_sentence(tmp_path):
    # rank 1 fails at its third step (a stand-in for its disk or its data); rank 0 is ended by torchrun
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import twintune.train.loop as loop\n"
        "    from twintune.errors import TwintuneError\n"
        "    step = loop.train_step\n"
        "    def failing(run, n):\n"
        "        if n == 2:\n"
        "            raise TwintuneError('rank 1 could not read its batch (injected).')\n"
        "        return step(run, n)\n"
        "    loop.train_step = failing\n")
    sentence = _sentence({"PYTHONPATH": os.pathsep.join([str(hook), os.getcwd()])}, "--backend", "torch", "--nproc",
                         "2", "--out", str(tmp_path / "r"), *[a for item in SMALL for a in ("--set", item)],
                         timeout=300)
    assert sentence == "twintune: error: rank 1 could not read its batch (injected)."
