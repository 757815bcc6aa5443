"""The rules that turn (row, job record, scheduler state, where it came from, time) into a cell's state
(aletheia_hpc/campaign/state.py), one case per line."""

from __future__ import annotations

import pytest

from aletheia_hpc.campaign.state import ACCOUNTING_GRACE_S, cell_state

CID = "c0ffee0000000001"
NOW = 1_000_000.0


def row(status="ok", cell_id=CID, config_hash=None, reason=None):
    failure = reason or ({"failed": "exception: RuntimeError: boom\ntrace", "nan_abort": "nan_abort: loss nan at 3"}
                         .get(status))
    return {"cell_id": cell_id, "config_hash": config_hash or cell_id, "status": status, "failure_reason": failure}


def job(age_s=10.0, cluster="dev", jid="77_1"):
    return {"job_id": jid, "array_job_id": jid.split("_")[0], "submitted_at": NOW - age_s, "cluster": cluster}


OLD = ACCOUNTING_GRACE_S + 60
FOREIGN = f"/r/cells/{CID}/row.json: this row.json is not this cell's (cell_id=beef000000000002, its directory is {CID})"

CASES = [
    # (name, row, row_problem, job, sched, source, expected state, reason starts with / contains, show_log)
    ("nothing yet", None, None, None, None, "sacct", "missing", None, False),
    ("unreadable row", None, "row.json: cannot read row", None, None, "sacct", "missing",
     "damaged row.json: cannot read row: not counted", False),
    ("ok row", row(), None, None, None, "sacct", "done", None, False),
    ("ok row beats a running job", row(), None, job(), "RUNNING", "sacct", "done", None, False),
    ("ok row, accounting down", row(), None, job(), None, "none", "done", None, False),
    ("queued", None, None, job(), "PENDING", "sacct", "pending", "job 77_1 PENDING", False),
    ("requeued", None, None, job(), "REQUEUED", "sacct", "pending", "job 77_1 REQUEUED", False),
    ("running", None, None, job(), "RUNNING", "sacct", "running", "job 77_1 RUNNING", False),
    ("running, seen by squeue", None, None, job(), "RUNNING", "squeue", "running", "job 77_1", False),
    ("running local launch", None, None, job(cluster="local"), "RUNNING", "local", "running", "job 77_1", False),
    ("just submitted, not in accounting", None, None, job(), None, "sacct", "pending", "job 77_1 submitted", False),
    ("lost from accounting", None, None, job(OLD), None, "sacct", "missing", "job 77_1 is unknown", False),
    ("lost but left a failed row", row("failed"), None, job(OLD), None, "sacct", "failed", "exception:", True),
    ("cancelled, no row", None, None, job(), "CANCELLED", "sacct", "failed", "CANCELLED: job 77_1", False),
    ("timeout, no row", None, None, job(), "TIMEOUT", "sacct", "failed", "TIMEOUT: job 77_1", False),
    ("out of memory", None, None, job(), "OUT_OF_MEMORY", "sacct", "failed", "OUT_OF_MEMORY", False),
    ("job failed, no row", None, None, job(), "FAILED", "sacct", "failed", "FAILED: job 77_1", True),
    ("completed without row", None, None, job(), "COMPLETED", "sacct", "failed", "COMPLETED without a row", False),
    ("failed row", row("failed"), None, job(), "FAILED", "sacct", "failed", "exception: RuntimeError: boom", True),
    ("nan_abort row, job FAILED", row("nan_abort"), None, job(), "FAILED", "sacct", "nan_abort", "nan_abort:", False),
    ("nan_abort row, no job", row("nan_abort"), None, None, None, "sacct", "nan_abort", "nan_abort:", False),
    ("failed row, job running again", row("failed"), None, job(), "RUNNING", "sacct", "running", "job 77_1", False),
    ("another cluster's job, no row", None, None, job(cluster="leonardo"), None, "sacct", "missing",
     "job 77_1 ran on cluster leonardo, not dev", False),
    ("another cluster's job, failed row", row("failed"), None, job(cluster="leonardo"), None, "sacct", "failed",
     "exception:", True),
    ("squeue: no longer queued, no row", None, None, job(), None, "squeue", "missing", "job 77_1 is no longer queued",
     False),
    ("squeue: ended with a nan row", row("nan_abort"), None, job(), None, "squeue", "nan_abort", "nan_abort", False),
    ("local launch ended, no row", None, None, job(cluster="local"), None, "local", "missing", "job 77_1 is no longer",
     False),
    ("scheduler unreachable", None, None, job(OLD), None, "none", "unknown", "job 77_1: the scheduler cannot", False),
    ("scheduler unreachable, failed row", row("failed"), None, job(), None, "none", "failed", "exception:", True),
    # a foreign or impossible row never reaches cell_state: the row validator (row.read_row) makes it a problem
    ("damaged row, job gone", None, FOREIGN, job(), None, "squeue", "missing",
     "job 77_1 is no longer queued and left no valid row (damaged /r/cells/c0ffee0000000001/row.json: this row.json "
     "is not this cell's", False),
    ("damaged row, job running", None, FOREIGN, job(), "RUNNING", "sacct", "running",
     "job 77_1 RUNNING; damaged /r/cells/", False),
    ("damaged row, job cancelled", None, FOREIGN, job(), "CANCELLED", "sacct", "failed",
     "CANCELLED: job 77_1; damaged /r/cells/", False),
]


@pytest.mark.parametrize("name, row_, problem, job_, sched, source, state, reason, show_log", CASES,
                         ids=[c[0] for c in CASES])
def test_cell_state(name, row_, problem, job_, sched, source, state, reason, show_log):
    got = cell_state(CID, row_, problem, job_, sched, source, NOW, "dev" if not job_ or job_["cluster"] != "local"
                     else "local")
    assert got.state == state, got
    if reason is None:
        assert got.reason is None, got
    else:
        assert got.reason and got.reason.startswith(reason), got
    assert got.show_log == show_log, got


# sacct -n -P -D -o JobID,State,ElapsedRaw,AllocTRES,MaxRSS as the dev cluster (SLURM 22.05) prints it:
# a task requeued once (two allocation lines), a cancelled one, and a pending rest of the array
SACCT = """\
105_0|REQUEUED|120|billing=4,cpu=4,gres/gpu=2,mem=16G,node=1|
105_0.batch|CANCELLED|120|cpu=4,gres/gpu=2,mem=16G,node=1|12336K
105_0.0|CANCELLED|121|cpu=4,gres/gpu=2,mem=16G,node=1|1.5G
105_0|COMPLETED|60|billing=4,cpu=4,gres/gpu=2,mem=16G,node=1|
105_0.batch|COMPLETED|60|cpu=4,gres/gpu=2,mem=16G,node=1|12000K
105_0.0|COMPLETED|59|cpu=4,gres/gpu=2,mem=16G,node=1|548060K
105_1|CANCELLED|293|billing=1,cpu=1,mem=4G,node=1|
105_1.0|CANCELLED|297|cpu=1,mem=4G,node=1|540896K
105_[2-3%2]|PENDING|0||
"""


def test_one_sacct_answer_gives_states_and_each_jobs_usage():
    from aletheia_hpc.campaign.slurm import parse_sacct
    from aletheia_hpc.campaign.store import gpu_hours

    states, usage = parse_sacct(SACCT)
    assert {k: v for k, v in states.items() if "." not in k} == {
        "105_0": "COMPLETED", "105_1": "CANCELLED", "105_2": "PENDING", "105_3": "PENDING"}
    assert usage["105_0"] == {"elapsed_s": 180, "alloc_cpus": 4, "alloc_gpus": 2, "max_rss_mib": 1536.0}
    assert usage["105_1"] == {"elapsed_s": 293, "alloc_cpus": 1, "alloc_gpus": 0,
                              "max_rss_mib": pytest.approx(540896 / 1024)}
    assert "105_2" not in usage  # never started
    assert gpu_hours(usage["105_0"]) == pytest.approx(0.1)  # 180 s on 2 GPUs, both runs counted


def test_the_controllers_queue_fills_in_what_accounting_has_not_recorded_yet():
    from aletheia_hpc.campaign.slurm import fill_from_queue

    accounting = {"7_0": "COMPLETED", "7_1": "PENDING", "7_2": "RUNNING", "7_3": "RUNNING"}
    queue = {"7_1": "RUNNING", "7_3": "COMPLETING", "7_4": "RUNNING", "8_0": "PENDING"}
    jobs = ["7_0", "7_1", "7_2", "7_3", "7_4", "7_5"]
    assert fill_from_queue(accounting, jobs, lambda: queue) == {
        "7_0": "COMPLETED",   # ended: accounting's word
        "7_1": "RUNNING",     # started; accounting still says PENDING
        "7_2": "RUNNING",     # ended a moment ago: busy until accounting records how
        "7_3": "COMPLETING",
        "7_4": "RUNNING",     # not in accounting yet
    }                         # 7_5: known to neither; 8_0: not this campaign's
    assert accounting["7_1"] == "PENDING"  # not changed in place

    def no_controller_call():
        raise AssertionError("squeue asked although every job has ended in accounting")
    assert fill_from_queue({"7_0": "COMPLETED", "7_1": "FAILED"}, ["7_0", "7_1"],
                           no_controller_call) == {"7_0": "COMPLETED", "7_1": "FAILED"}
