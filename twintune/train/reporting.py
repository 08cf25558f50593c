"""Where a run's figures go besides metrics.jsonl: TensorBoard event files and Weights & Biases
(`train.report_to`), and one console line every `train.log_every` steps.

metrics.jsonl stays the record (resume, `twintune doctor`, plots read it); a reporter gets each of
its lines as it is written, under transformers' names (`train/loss`, `train/learning_rate`,
`train/grad_norm`, `eval/accuracy`, `eval/loss`, ...), so a dashboard built for transformers' runs
reads ours. Tokens/s and peak memory, which differ from one run of the same recipe to the next,
are reported every `train.log_every` steps and printed, never written to metrics.jsonl (a resumed
run's file equals an uninterrupted one's). Only the process that writes the run's files reports.

Everything here is plain Python; the reporters' libraries are imported when a recipe asks for them
(`pip install 'twintune[report]'`).
"""

from __future__ import annotations

import math
import shutil
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from twintune.errors import TwintuneError

# metrics.jsonl's names that transformers spells otherwise (the rest keep theirs under train/ or eval/)
RENAMED = {"lr": "learning_rate"}
NOT_REPORTED = {"step", "rank_examples"}  # the x axis itself; a per-process list


LIBRARIES = {"tensorboard": ("tensorboardX", "writer (tensorboardX)"), "wandb": ("wandb", "client")}


def require(names: list[str]) -> None:
    """Each reporter's library imports, or a sentence saying how to install it (before the model loads).

    Example:
        >>> require(["tensorboard"])
    """
    import importlib

    for name in names:
        library, what = LIBRARIES[name]
        try:
            importlib.import_module(library)
        except ImportError:
            extra = " (WANDB_MODE=offline works without an account)" if name == "wandb" else ""
            raise TwintuneError(f"train.report_to names {name}, whose {what} is not installed: pip install "
                                f"'twintune[report]'{extra}.") from None


def reported(line: dict) -> dict[str, float]:
    """The scalars one metrics.jsonl line reports, by transformers' names: an evaluation's `val_X` as
    `eval/X`, a step's figures as `train/X`; lists, text, flags and missing values are left out.

    Example:
        >>> reported({"step": 3, "loss": 0.5, "lr": 1e-4, "grad_norm": None, "tokens": 96})
        {'train/loss': 0.5, 'train/learning_rate': 0.0001, 'train/tokens': 96.0}
        >>> reported({"step": 3, "val_accuracy": 0.9, "val_loss/wiki": 2.5, "labels": ["a", "b"]})
        {'eval/accuracy': 0.9, 'eval/loss/wiki': 2.5}
    """
    scalars = {}
    for key, value in line.items():
        if key in NOT_REPORTED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = f"eval/{key[len('val_'):]}" if key.startswith("val_") else f"train/{RENAMED.get(key, key)}"
        scalars[name] = float(value)
    return scalars


class TensorBoard:
    """Event files under the run's `tensorboard/`, in TensorBoard's format (TFRecord framing around
    Event protobufs), written here: one Event per metrics line holding all its scalars, encoded by
    hand (8 fields of three message types) and checksummed with tensorboardX's CRC-32C (native with
    the `crc32c` package). tensorboardX's own SummaryWriter costs ~40 us a scalar on its caller's
    thread and a writer thread beside it: 5% of the demo's 13 ms step on 2 cores; this, one record a
    line, is ~0.1% (benchmarks/README.md). A resumed run writes the file anew from its metrics, so it
    never holds a step twice (a killed run's steps after its last checkpoint are trained again)."""

    def __init__(self, out: Path, replay: list[dict]):
        directory = out / "tensorboard"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        self.file = open(directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}", "wb")
        self._record(b"\x09" + struct.pack("<d", time.time()) + _bytes_field(3, b"brain.Event:2"))
        self.flushed = time.monotonic()
        for line in replay:
            self.line(line)
        self.file.flush()

    def line(self, line: dict) -> None:
        self.scalars(line["step"], reported(line))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One Event: the step's wall time, the step, and a Summary of (tag, simple_value) values; on
        disk within 5 seconds (what a TensorBoard watching the run sees)."""
        summary = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                           for tag, value in values.items())
        self._record(b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + _bytes_field(5, summary))
        if time.monotonic() - self.flushed > 5:
            self.file.flush()
            self.flushed = time.monotonic()

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self.file.write(header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data)))

    def close(self) -> None:
        self.file.close()


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of a record's length or data (tensorboardX's CRC: native with the
    `crc32c` package; require() has checked tensorboardX is there)."""
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


class WandB:
    """A Weights & Biases run through its client: project $WANDB_PROJECT (default twintune), named
    after the run directory, the recipe as its config, files under the run's `wandb/`. WANDB_MODE=offline
    needs no account (`wandb sync` uploads later). A resumed run continues the same W&B run (its id is
    in the checkpoint's history); W&B's steps only go forward, so what it already has is not sent again.

    Steps go to W&B as transformers' `logging_steps` and mlx-lm's `steps_per_report` send them: one
    record every `every` steps (`train.log_every`; 0: every step), the steps' mean of each figure, the
    learning rate and gradient norm of the last; evaluations as they come. Its client and service take
    ~1 ms of CPU a record: 7% of the demo's 15 ms torch step on 2 cores if every step were sent."""

    def __init__(self, out: Path, config: dict, run_id: str | None, every: int):
        import os

        import wandb  # (require() has checked it is there)

        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "twintune"), name=out.name, dir=str(out),
                                  config=config, id=run_id, resume="allow" if run_id else None)
        except Exception as error:  # wandb's own errors name no common base class
            raise TwintuneError(f"wandb could not start a run ({str(error).splitlines()[0]}); log in with `wandb "
                                "login`, or set WANDB_MODE=offline to keep the run on this machine.") from None
        self.id, self.last_step, self.every, self.window = self.run.id, 0, every, []

    def line(self, line: dict) -> None:
        if not is_step(line):
            self.scalars(line["step"], reported(line))
            return
        self.window.append(line)
        if not self.every or line["step"] % self.every == 0:
            self.flush()

    def flush(self) -> None:
        """The window's steps as one record, at its last step."""
        if self.window:
            self.scalars(self.window[-1]["step"], window_scalars(self.window))
            self.window = []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        # a final evaluation logged at an earlier (best) step goes in at the last one: W&B's steps only go forward
        self.last_step = max(step, self.last_step)
        self.run.log(values, step=self.last_step)

    def close(self) -> None:
        self.flush()
        self.run.finish()


def is_step(line: dict) -> bool:
    """A training step's metrics line (not an evaluation's, nor a failed step's sentence)."""
    return "loss" in line and "lr" in line


LAST_OF_WINDOW = ("train/learning_rate", "train/grad_norm")  # as transformers logs them; the rest: means


def window_scalars(lines: list[dict]) -> dict[str, float]:
    """Steps' scalars as one record: the mean of each figure over the steps that have it, the learning
    rate and gradient norm of the last step that has them.

    Example:
        >>> window_scalars([{"step": 1, "loss": 2.0, "lr": 1e-4, "grad_norm": 3.0},
        ...                 {"step": 2, "loss": 1.0, "lr": 2e-4, "grad_norm": None}])
        {'train/loss': 1.5, 'train/learning_rate': 0.0002, 'train/grad_norm': 3.0}
    """
    values: dict[str, list[float]] = {}
    for line in lines:
        for name, value in reported(line).items():
            values.setdefault(name, []).append(value)
    return {name: seen[-1] if name in LAST_OF_WINDOW else math.fsum(seen) / len(seen) for name, seen in values.items()}


class Reporters:
    """The run's reporters (`train.report_to`), on the process that writes the run's files.

    Example:
        >>> reporters = Reporters([], Path("runs/demo"), {})
        >>> reporters.line({"step": 1, "loss": 0.5}); reporters.close()   # none asked for: nothing done
    """

    def __init__(self, names: list[str], out: Path, config: dict, wandb_id: str | None = None,
                 replay: list[dict] = (), every: int = 0):
        self.reporters, self.wandb_id = [], wandb_id
        if "tensorboard" in names:
            self.reporters.append(TensorBoard(out, list(replay)))
        if "wandb" in names:
            wandb = WandB(out, config, wandb_id, every)
            self.reporters.append(wandb)
            self.wandb_id = wandb.id

    def line(self, line: dict) -> None:
        """One metrics.jsonl line, as it is written."""
        for reporter in self.reporters:
            reporter.line(line)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for reporter in self.reporters:
            reporter.scalars(step, values)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


class Watch:
    """Every `every` steps: one console line (the steps' mean loss, the learning rate, tokens/s and
    peak memory since the last line, as mlx-lm prints), and tokens/s and peak memory to the reporters.

    Example:
        >>> watch = Watch(2, 10, Reporters([], Path("runs/demo"), {}), lambda: 512.0, print)
        >>> for step in (1, 2):
        ...     watch.step({"step": step, "loss": 1.0 * step, "lr": 2e-4, "tokens": 100})   # doctest: +ELLIPSIS
        step 2/10: loss 1.5000, lr 2.00e-04, ... tokens/s, peak 512 MB
    """

    def __init__(self, every: int, total: int, reporters: Reporters, peak_mb: Callable[[], float],
                 say: Callable[[str], None] | None):
        self.every, self.total, self.reporters, self.peak_mb, self.say = every, total, reporters, peak_mb, say
        self.losses, self.tokens, self.started = [], 0, time.perf_counter()

    def step(self, record: dict) -> None:
        self.losses.append(record["loss"])
        self.tokens += record["tokens"]
        if not self.every or record["step"] % self.every:
            return
        seconds = max(time.perf_counter() - self.started, 1e-9)
        tokens_per_s, peak = self.tokens / seconds, self.peak_mb()
        self.reporters.scalars(record["step"], {"train/tokens_per_second": tokens_per_s, "train/peak_memory_mb": peak})
        if self.say:
            loss = math.fsum(self.losses) / len(self.losses)
            self.say(f"step {record['step']}/{self.total}: loss {loss:.4f}, lr {record['lr']:.2e}, "
                     f"{tokens_per_s:,.0f} tokens/s, peak {peak:,.0f} MB")
        self.losses, self.tokens, self.started = [], 0, time.perf_counter()


def read_tensorboard(directory: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a directory's event files, by tag: (step, value) in the order written. Read with
    tensorboardX's own Event protobuf, each record's length and data checked against its CRC.

    Example:
        >>> sorted(read_tensorboard("runs/no-such-run/tensorboard"))
        []
    """
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            header = data[at: at + 8]
            (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8: at + 12])
            body = data[at + 12: at + 12 + length]
            (body_crc,) = struct.unpack("<I", data[at + 12 + length: at + 16 + length])
            if masked_crc(header) != length_crc or masked_crc(body) != body_crc:
                raise TwintuneError(f"event file {path} is corrupt at byte {at}.")
            event = Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
            at += 16 + length
    return scalars
