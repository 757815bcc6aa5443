"""The one rule set that turns what is known about a cell into its state.

Inputs: the cell's row (if any), its latest job record, what the scheduler says of that job, where
that came from (accounting, the controller's queue, a local launch, or nothing), and the time.
``cell_state`` is a pure function of them; tests/test_campaign_state.py lists its cases.

States: ``done`` (an ok row of this cell), ``pending``/``running`` (its job is queued or runs),
``failed`` and ``nan_abort`` (a row or a job that ended without a result), ``missing`` (nothing
ran, or nothing of it is left: launch and resubmit run it), ``unknown`` (a job was submitted but
the scheduler cannot be asked: launch and resubmit leave it alone rather than run it twice).
"""

from __future__ import annotations

from dataclasses import dataclass

STATES = ("done", "pending", "running", "failed", "nan_abort", "missing", "unknown")
BUSY = ("pending", "running", "unknown")  # not to be submitted again
# A job that accounting does not know counts as just submitted for this long; after that it is lost
# (accounting purged, another cluster's or a wiped cluster's job id) and its cell is missing.
ACCOUNTING_GRACE_S = 300

# SLURM's job states (22.05, squeue/sacct): the queued or running ones (held ones included: they wait
# for an operator, and are never submitted a second time) ...
ACTIVE = {"PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
          "REQUEUE_FED": "pending", "RESIZING": "pending", "SUSPENDED": "pending",
          "SPECIAL_EXIT": "pending", "RESV_DEL_HOLD": "pending",
          "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
          "SIGNALING": "running", "STAGE_OUT": "running", "STOPPED": "running"}
# ... and the ended ones. A state in neither (a newer SLURM's, or one that could not be read) makes the
# cell unknown, never failed or missing: launch and resubmit would run it a second time.
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE", "REVOKED"})
# Ended runs after which SLURM queues a --requeue job again by itself: until accounting records the
# new run, the controller's queue has the latest word on such a job.
REQUEUED_BY_SLURM = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"})

# Where the scheduler's word came from. sacct knows ended jobs; squeue and a local launch know only
# the jobs still queued or running (absent = ended, outcome unknown); "none": nobody could be asked.
SOURCES = ("sacct", "squeue", "local", "none")


@dataclass(frozen=True)
class CellState:
    state: str
    reason: str | None = None
    show_log: bool = False  # the caller appends the tail of the cell's last log to the reason


def cell_state(cell_id: str, row: dict | None, row_problem: str | None, job: dict | None,
               sched: str | None, source: str, now: float, cluster: str) -> CellState:
    """The state of cell ``cell_id``.

    ``row``: its valid row file, or None (``row_problem``: why a row file is not valid). ``job``: its
    latest job record (job_id, submitted_at, cluster), or None. ``sched``: the scheduler's state of
    that job (e.g. 'RUNNING', 'CANCELLED'), or None when ``source`` does not list it. ``cluster``:
    the cluster asked (a job of another one is not asked about). ``row`` has passed the one row
    validator (row.read_row: it is this cell's, its times are possible); a damaged row file is a
    ``row_problem`` that names the file, in the reason of whatever state the job gives."""
    note = f"damaged {row_problem}: not counted" if row_problem else None
    if row is not None and row["status"] == "ok":
        return CellState("done")
    if job is not None and job.get("cluster", cluster) != cluster:
        if row is None:
            return CellState("missing", f"job {job['job_id']} ran on cluster {job['cluster']}, not {cluster}; "
                                        "resubmit runs the cell here")
        job = None  # its row speaks for it
    if job is not None:
        jid = job["job_id"]
        if sched in ACTIVE:
            return CellState(ACTIVE[sched], f"job {jid} {sched}" + (f"; {note}" if note else ""))
        if sched is not None and sched not in ENDED:
            return CellState("unknown", f"job {jid} is in scheduler state {sched}, which this tool does not know: "
                                        "launch and resubmit leave it alone")
        age = now - job["submitted_at"]
        if sched is None and source == "sacct" and age <= ACCOUNTING_GRACE_S:
            return CellState("pending", f"job {jid} submitted (not yet in accounting)")
        if sched is None and source == "none" and row is None:
            return CellState("unknown", f"job {jid}: the scheduler cannot be asked whether it is queued")
        if sched is None and row is None:
            if source == "sacct":
                return CellState("missing", f"job {jid} is unknown to this cluster's accounting "
                                            f"{age / 60:.0f} min after submission; resubmit runs the cell again")
            return CellState("missing", f"job {jid} is no longer queued and left no valid row"
                                        + (f" ({note})" if note else "") + "; resubmit runs the cell again")
    if row is not None:
        reason = row["failure_reason"] or row["status"]
        if row["status"] == "nan_abort":
            return CellState("nan_abort", reason.splitlines()[0])
        return CellState("failed", reason.splitlines()[0], show_log=True)
    if job is not None:  # ended (sched is a terminal state) without a row
        jid = job["job_id"]
        also = f"; {note}" if note else ""
        if sched == "COMPLETED":
            return CellState("failed", f"COMPLETED without a row: job {jid}{also}")
        return CellState("failed", f"{sched}: job {jid}{also}", show_log=sched == "FAILED")
    return CellState("missing", note)
