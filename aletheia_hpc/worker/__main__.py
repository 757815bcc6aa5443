"""``python -m aletheia_hpc.worker CELL_DIR [--progress] [--cpu-fallback]``: run the cell whose
cell.json lies in CELL_DIR (``--cpu-fallback``: a cell that asked for GPUs may train on the CPU).
Exit status: 0 for an ok row, NAN_EXIT_CODE for a nan_abort row, 1 for a failed one, REQUEUE_EXIT_CODE
when it checkpointed on request and must run again.

The dispatchers (local runner and SLURM job arrays) start cells this way; CELL_DIR is
``<results_dir>/<campaign>/cells/<cell_id>``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from aletheia_hpc.worker.stop import StopSignal, install_stop_handlers


def main(argv: list[str]) -> int:
    stop = StopSignal()
    install_stop_handlers(stop)  # first: a signal during the imports below must not kill the worker
    from aletheia_hpc.campaign.store import CELL_CONFIG_FILE, NAN_EXIT_CODE, REQUEUE_EXIT_CODE
    from aletheia_hpc.config import CellConfig
    from aletheia_hpc.worker.cell import run_cell
    from aletheia_hpc.worker.training import StopForRequeue

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work_dir = Path(argv[0])
    cell = CellConfig.from_dict(json.loads((work_dir / CELL_CONFIG_FILE).read_text()))
    results_dir = work_dir.parent.parent.parent
    try:
        row = run_cell(cell, results_dir, stop=stop, progress=sys.stderr.isatty() or "--progress" in argv,
                 cpu_fallback="--cpu-fallback" in argv)
    except StopForRequeue as exc:
        logging.info("%s", exc)
        return REQUEUE_EXIT_CODE
    except Exception:
        logging.exception("cell %s failed", cell.cell_id)
        return 1
    return NAN_EXIT_CODE if row["status"] == "nan_abort" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
