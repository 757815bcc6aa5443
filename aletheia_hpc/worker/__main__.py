"""``python -m aletheia_hpc.worker CELL_DIR [--progress] [--cpu-fallback]``: run the cell whose
cell.json lies in CELL_DIR (``--cpu-fallback``: a cell that asked for GPUs may train on the CPU).
Exit status: 0 for an ok row, NAN_EXIT_CODE for a nan_abort row, 1 for a failed one, REQUEUE_EXIT_CODE
when it checkpointed on request (or because its launcher died) and must run again.

The dispatchers (local runner and SLURM job arrays) start cells this way; CELL_DIR is
``<results_dir>/<campaign>/cells/<cell_id>``. The worker waits for the cell's lock while another
writer (run-cell) holds it, and runs nothing when that writer left an ok row.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from aletheia_hpc.worker.stop import StopSignal, install_stop_handlers

LAUNCHER_POLL_S = 1.0


class LauncherWatch:
    """Notices that the process that started this worker (a local launch, SLURM's job function) died:
    the worker is then reparented, and its output pipe breaks. Either way it asks training to
    checkpoint and stop, and sends its further output to the cell's newest attempt log: an
    interruption, not a failure of the cell (a relaunch resumes from the checkpoint)."""

    def __init__(self, stop: StopSignal, work_dir: Path):
        self.stop, self.work_dir = stop, work_dir
        self.parent = os.getppid()
        self.gone: str | None = None  # why the launcher counts as dead
        self._lock = threading.Lock()

    def start(self) -> None:
        sys.stdout, sys.stderr = _PipeGuard(sys.stdout, self), _PipeGuard(sys.stderr, self)
        threading.Thread(target=self._poll, name="launcher-watch", daemon=True).start()

    def _poll(self) -> None:
        while self.gone is None:
            if os.getppid() != self.parent:
                self.lost(f"its launcher (pid {self.parent}) died")
            time.sleep(LAUNCHER_POLL_S)

    def lost(self, why: str) -> None:
        with self._lock:
            if self.gone is not None:
                return
            self.gone = why
            logs = sorted((self.work_dir / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
            target = os.open(logs[-1] if logs else os.devnull, os.O_WRONLY | os.O_APPEND)
            for fd in (1, 2):  # every writer, C code and tqdm included, goes on into the log
                os.dup2(target, fd)
            os.close(target)
            self.stop.request()
        logging.warning("worker: %s; checkpointing and stopping (an interruption, not a failure of the cell)", why)


class _PipeGuard:
    """A text stream whose writes survive a broken pipe: the first one tells the LauncherWatch, which
    points the stream's file descriptor at the cell's log, and the write is made again there."""

    def __init__(self, stream, watch: LauncherWatch):
        self._stream, self._watch = stream, watch

    def _call(self, name: str, *args):
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            self._watch.lost("its launcher's output pipe broke (the launcher died)")
            return getattr(self._stream, name)(*args)

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str]) -> int:
    stop = StopSignal()
    install_stop_handlers(stop)  # first: a signal during the imports below must not kill the worker
    work_dir = Path(argv[0])
    watch = LauncherWatch(stop, work_dir)
    watch.start()
    from aletheia_hpc.campaign.store import CELL_CONFIG_FILE, NAN_EXIT_CODE, REQUEUE_EXIT_CODE
    from aletheia_hpc.config import CellConfig
    from aletheia_hpc.worker.cell import record_interruption, run_cell
    from aletheia_hpc.worker.training import StopForRequeue

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cell = CellConfig.from_dict(json.loads((work_dir / CELL_CONFIG_FILE).read_text()))
    results_dir = work_dir.parent.parent.parent
    try:
        row = run_cell(cell, results_dir, stop=stop, progress=sys.stderr.isatty() or "--progress" in argv,
                       cpu_fallback="--cpu-fallback" in argv, dispatched=True)
    except StopForRequeue as exc:
        if watch.gone:
            record_interruption(work_dir, f"interrupted: {watch.gone}; {exc}")
        logging.info("%s", exc)
        return REQUEUE_EXIT_CODE
    except Exception:
        logging.exception("cell %s failed", cell.cell_id)
        return 1
    return NAN_EXIT_CODE if row["status"] == "nan_abort" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
