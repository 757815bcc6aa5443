"""The worker's stop request: what SLURM's pre-timeout warning (SIGUSR2) and SIGTERM turn into.

No torch here: the worker installs its handlers before the heavy imports, so that a signal during
start-up is a request to stop (training checkpoints after its next step), not the signal's default
action, which would kill the worker.
"""

from __future__ import annotations

import signal


class StopSignal:
    """Set from a signal handler; training checkpoints and stops at the next step boundary.

    A plain flag, no lock: SLURM signals every process of the job step and the job function forwards
    the signal too, so a second handler can run inside the first. A threading.Event deadlocks there
    (its set() takes a non-reentrant lock); the worker then freezes until the time limit kills it."""

    def __init__(self) -> None:
        self._requested = False

    def request(self, *_signal_args) -> None:
        self._requested = True

    @property
    def requested(self) -> bool:
        return self._requested


def install_stop_handlers(stop: StopSignal) -> None:
    """SIGUSR2 (SLURM's --signal warning; USR1 belongs to NCCL) and SIGTERM request a stop."""
    signal.signal(signal.SIGUSR2, stop.request)
    signal.signal(signal.SIGTERM, stop.request)
