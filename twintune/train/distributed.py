"""Several processes, one model: which process this is, and its share of every step.

The launchers people already have start the processes: `torchrun` (torch: it sets RANK and
WORLD_SIZE) and `mlx.launch` (MLX's ring backend: it sets MLX_RANK and MLX_HOSTFILE). Every process
builds the same run and reads the same seeded batches; each takes a contiguous share of every
micro-batch's rows (`share`), and the backend sums the gradients over the processes before the
optimizer step. The loss is a sum over target tokens divided by the step's global count of
targets, which every process knows without asking (it holds the whole batch), so N processes give
one process's step up to the order of float additions. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from twintune.backends import capabilities
from twintune.data.batching import Batch
from twintune.errors import TwintuneError


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""
    rank: int = 0
    size: int = 1
    launcher: str | None = None  # "torchrun" or "mlx.launch"; None: one process, no launcher
    timeout: float = 300.0  # seconds a process waits for the others to join (TWINTUNE_JOIN_TIMEOUT)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (rank 0 only)."""
        return self.rank == 0


ALONE = World()
JOIN_TIMEOUT_ENV = "TWINTUNE_JOIN_TIMEOUT"  # seconds a process waits for the others (default 300)


def join_timeout() -> float:
    """How long a process waits for the others to join (and then for any one collective)."""
    try:
        return float(os.environ.get(JOIN_TIMEOUT_ENV, "300"))
    except ValueError:
        raise TwintuneError(f"{JOIN_TIMEOUT_ENV} must be a number of seconds, got "
                            f"{os.environ[JOIN_TIMEOUT_ENV]!r}.") from None


def launched_world() -> World:
    """The world a launcher announced in the environment (not yet joined), or ALONE."""
    if "MLX_RANK" in os.environ:
        hosts = os.environ.get("MLX_HOSTFILE")
        try:
            size = len(json.loads(open(hosts).read())) if hosts else int(os.environ.get("MLX_WORLD_SIZE", "1"))
        except (OSError, ValueError):
            raise TwintuneError(f"mlx.launch's host file {hosts} cannot be read; start the run with mlx.launch "
                                "again.") from None
        return World(int(os.environ["MLX_RANK"]), size, "mlx.launch", join_timeout())
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "torchrun", join_timeout())
    return ALONE


def check_world(world: World, backend: str, recipe) -> None:
    """The launcher must be the backend's own, the task one that trains in steps, and the global
    batch must divide among the processes."""
    if recipe.train.fsdp and not capabilities(backend).sharding:
        raise TwintuneError(f"train.fsdp shards the model through torch's FSDP2; the {backend} backend keeps the whole "
                            "model on every process: remove train.fsdp.")
    if world.size == 1:
        return
    wanted = capabilities(backend).launcher
    if world.launcher != wanted:
        raise TwintuneError(f"this run uses the {backend} backend, which runs on several processes through "
                            f"{wanted}, but it was started by {world.launcher}.")
    if not recipe.task.trains_in_steps:
        raise TwintuneError(f"task {recipe.task.name} fits its classifier in one process (its features are computed "
                            "once and cached); run it without a launcher.")
    batch_size = recipe.train.batch_size
    if batch_size % world.size:
        raise TwintuneError(f"train.batch_size {batch_size} (the global batch) does not divide among "
                            f"{world.size} processes; make it a multiple of {world.size}.")


def share_bounds(rows: int, world: World) -> list[int]:
    """Where each process's rows start (and the last ends): shares as equal as rows allow, the first
    processes taking one more where they cannot be equal (an epoch's last, smaller batch)."""
    return [k * (rows // world.size) + min(k, rows % world.size) for k in range(world.size + 1)]


def share(batch: Batch, world: World) -> Batch | None:
    """This process's contiguous share of a micro-batch's rows, re-padded to its own longest row
    (None: the batch has fewer rows than there are processes, and none are this one's)."""
    if world.size == 1:
        return batch
    bounds = [bound * batch.rows_per_example for bound in share_bounds(batch.examples, world)]
    start, stop = bounds[world.rank], bounds[world.rank + 1]
    return take_rows(batch, start, stop) if stop > start else None


def mine(batches: list, world: World) -> list:
    """This process's evaluation batches: every size-th, from its rank on."""
    return batches[world.rank::world.size]


def take_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows start..stop of a batch as a batch of their own (flat positions renumbered)."""
    width = batch.input_ids.shape[1]
    keep = int(batch.lengths[start:stop].max())

    def renumber(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row = positions // width
        mine = (row >= start) & (row < stop)
        return mine, ((row[mine] - start) * keep + positions[mine] % width).astype(np.int32)

    mine, target_positions = renumber(batch.target_positions)
    _, answer_positions = renumber(batch.answer_positions)
    shared = batch.segments is not None  # pairs sharing their prompt: two answers a row
    return dataclasses.replace(
        batch, input_ids=np.ascontiguousarray(batch.input_ids[start:stop, :keep]), target_positions=target_positions,
        targets=batch.targets[mine], answer_positions=answer_positions, labels=batch.labels[start:stop],
        lengths=batch.lengths[start:stop],
        example_index=None if batch.example_index is None else batch.example_index[start:stop],
        reference=None if batch.reference is None else batch.reference[mine],
        row_data={name: values[start:stop] for name, values in batch.row_data.items()},
        target_data={name: values[mine] for name, values in batch.target_data.items()},
        columns=None if batch.columns is None else batch.columns[start:stop],
        positions=None if not shared else np.ascontiguousarray(batch.positions[start:stop, :keep]),
        segments=None if not shared else np.ascontiguousarray(batch.segments[start:stop, :keep]),
        target_answer=None if not shared else (batch.target_answer[mine] - batch.group * start).astype(np.int32),
        first_row=batch.first_row + start, width_pad=batch.width_pad + width - keep)


def free_port(count: int = 1) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, and the `count - 1` after it too (torchrun's
    rendezvous takes one; MLX's ring one per process from its starting port: a busy neighbour made a
    rank fail to bind, "error 98", when another program held the next port)."""
    import socket

    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + count <= 65536 and all(_can_bind(port + k) for k in range(1, count)):
            return port
    raise TwintuneError(f"found no {count} free consecutive ports on 127.0.0.1 for the processes to meet on.")


def _can_bind(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launcher_command(backend: str, nproc: int, argv: list[str]) -> list[str]:
    """The command that runs `twintune ARGV` on `nproc` local processes through the backend's own
    launcher: torchrun (gloo or NCCL over 127.0.0.1) or mlx.launch (the ring backend on 127.0.0.1)."""
    import shutil
    import sys
    from pathlib import Path

    if capabilities(backend).launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "twintune", *argv]
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        launcher = shutil.which("mlx.launch")
        if launcher is None:
            raise TwintuneError("--nproc with the mlx backend needs mlx.launch (installed with mlx); it was not found.")
    # mlx.launch runs the command as given: the interpreter is named, and only "127.0.0.1" counts as local
    return [str(launcher), "--hosts", "127.0.0.1", "-n", str(nproc), "--backend", "ring",
            "--starting-port", str(free_port(nproc)), "--", sys.executable, "-m", "twintune", *argv]


def launch(backend: str, nproc: int, argv: list[str]) -> int:
    """Run `twintune ARGV` on `nproc` processes and wait. What the processes say passes through (their
    sentences and rank 0's progress bar); the launcher's own report is shown only when no process
    said why it failed.

    SIGTERM and SIGINT reach every process at once: the launcher and its processes run in a group of
    their own, the launcher deaf to both (it would kill its processes before they finish their
    step), the processes each stopping at the same step with a checkpoint (train/interrupt.py)."""
    import signal
    import subprocess
    import sys

    if nproc < 1:
        raise TwintuneError(f"--nproc must be 1 or more, got {nproc}.")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    process = subprocess.Popen(launcher_command(backend, nproc, argv), env=env, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=_deaf_to_stops)
    def forward(signum, frame):
        os.killpg(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        held, said = _pass_sentences(process)
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        if said.startswith(f"twintune: stopped by {name} "):
            return 128 + signum  # as one process stopped by it would (mlx.launch itself ends with 0)
    if said.startswith("twintune: error: "):
        return 2
    if code == 0:
        return 0
    sys.stderr.write("".join(held[-150:]))  # the failing process's traceback, then the launcher's report
    sys.stderr.write(f"twintune: error: the {nproc} processes ended with exit code {code} and none said why "
                     "(the launcher's report is above).\n")
    return 2


def _deaf_to_stops() -> None:
    """In the launcher's process before it starts: SIGTERM and SIGINT ignored (its processes, which
    inherit that, take their own back: restore_stop_signals)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def restore_stop_signals() -> None:
    """A launched process answers SIGTERM and SIGINT again (its launcher was started deaf to them)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _pass_sentences(process) -> tuple[list[str], bool]:
    """The processes' sentences and progress bar written through as they come; the rest held back.
    Returns what was held and the last sentence a process said ("" if none)."""
    import re
    import sys

    held, pending, said, shown = [], "", "", set()
    while chunk := os.read(process.stderr.fileno(), 65536).decode(errors="replace"):
        *segments, pending = re.split(r"(?<=[\r\n])", pending + chunk)
        for segment in segments:
            if segment.startswith("twintune: ") and segment in shown:  # the same refusal from every process: once
                continue
            if segment.startswith("twintune: ") or segment.startswith("train:"):  # a sentence, the progress bar
                said = segment if segment.startswith(("twintune: error: ", "twintune: stopped by ")) else said
                shown.add(segment)
                sys.stderr.write(segment)
                sys.stderr.flush()
            else:
                held.append(segment)
    return held + [pending], said
