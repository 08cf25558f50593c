"""Stopping a run when asked: SIGTERM (spot instances, Slurm, Kubernetes: a grace period, then a
kill) and SIGINT (Ctrl-C). The step under way finishes, a checkpoint is written at it, and the run
ends with one sentence naming the checkpoint and the command that resumes it, exit 143 or 130.
A second Ctrl-C stops at once.

Several processes stop at the same step: after each step they sum their flags (one number), so a
signal that reaches one process, or each at a different moment, stops all of them together.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError

SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class Interrupted(TwintuneError):
    """A run stopped by a signal after writing a checkpoint; `exit_code` is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """The signals asked for while a run trains (a context manager: the handlers are ours inside it,
    the previous ones after). Outside the main thread, where Python cannot take signals, it does
    nothing and no stop is ever asked for."""

    def __init__(self):
        self.asked = 0  # the signal this process received (its handler sets it at any moment)
        self.signum = 0  # the signal every process stops for, once they agreed on it after a step
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._ask)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _ask(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.asked and time.monotonic() - self._asked_at > 1.0:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once (not a launcher's copy of the first)
        if not self.asked:
            self.asked, self._asked_at = signum, time.monotonic()

    def agree(self, backend, world) -> int:
        """After a step: the signal every process stops for (0: none), kept in `signum`. With several
        processes the flags are summed, so all stop at the same step; the first process's signal names
        it. (A signal that arrives during the sum counts at the next step: `asked` keeps it.)"""
        asked = self.asked
        if world.size > 1:
            flags = np.zeros(world.size, np.float64)
            flags[world.rank] = asked
            asked = int(next((value for value in backend.all_sum(flags) if value), 0))
        self.signum = asked
        return asked


def stopped(signum: int, step: int, checkpoint: Path, resume_command: str, quiet: bool = False) -> Interrupted:
    """The sentence a run stopped by a signal ends with (empty for the processes that stay silent)."""
    name = SIGNALS.get(signum, f"signal {signum}")
    message = (f"stopped by {name} after step {step}; the checkpoint {checkpoint} holds it; resume with: "
               f"{resume_command}")
    return Interrupted("" if quiet else message, signum)
