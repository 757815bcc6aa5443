"""Degrade, never crash: with the accounting daemon down, status falls back to the controller's queue
and says so in one line; with the controller down too, to the cells' files, naming the cause.
launch uses the same view, so it never submits a cell that is still running. The daemons are
stopped by PID and brought back with ``slurm/dev-cluster up``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from aletheia_hpc.provenance import REPO_ROOT
from tests.slurm_cluster import DEV_CLUSTER

pytestmark = pytest.mark.slurm


def run(cluster, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], env=cluster.env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"aletheia-hpc {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def by_recipe(cluster, ov) -> tuple[dict, dict]:
    st = json.loads(run(cluster, "status", "--json", *ov).stdout)
    return st, {c["recipe"]: c for c in st["cells"]}


def stop_daemon(cluster, name: str) -> None:
    pid = int((cluster.state_dir / "pids" / f"{name}.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read():
        assert time.monotonic() < deadline, f"{name} (pid {pid}) did not stop"
        time.sleep(0.2)


def test_status_and_launch_degrade_when_accounting_then_the_controller_stop(dev_cluster, tmp_path):
    # both cells sleep per step: they are still queued or running through every check below
    slow = "tiny-llama/standard/42:{sleep_per_step_s:90},tiny-llama/aletheia/42:{sleep_per_step_s:90}"
    ov = ["campaign=default", "cluster=dev", f"results_dir={tmp_path}", "campaign.name=degraded",
          "train.steps=4", f"+campaign.faults={{{slow}}}"]
    assert "submitted 2 cells" in run(dev_cluster, "launch", *ov).stderr
    deadline = time.monotonic() + 300
    while "running" not in (st := by_recipe(dev_cluster, ov)[0])["counts"]:
        assert time.monotonic() < deadline, st
        time.sleep(2)
    assert st["note"] is None and st["source"] == "sacct" and set(st["counts"]) <= {"pending", "running"}, st
    try:
        stop_daemon(dev_cluster, "slurmdbd")
        text = run(dev_cluster, "status", *ov).stdout  # exits 0
        (note,) = [line for line in text.splitlines() if line.startswith("note:")]
        assert "accounting (sacct) failed" in note and "states from the controller's queue" in note, text
        st, cells = by_recipe(dev_cluster, ov)
        assert st["source"] == "squeue" and "running" in st["counts"], st
        assert set(st["counts"]) <= {"pending", "running"}, st
        assert "submitted 0 cells" in run(dev_cluster, "launch", *ov).stderr  # they are still queued

        stop_daemon(dev_cluster, "slurmctld")
        text = run(dev_cluster, "status", *ov).stdout
        (note,) = [line for line in text.splitlines() if line.startswith("note:")]
        assert "accounting (sacct) failed" in note and "the controller (squeue) failed" in note, text
        assert "states from the cells' files only" in note
        st, cells = by_recipe(dev_cluster, ov)
        assert st["source"] == "none" and st["counts"] == {"unknown": 2}, st
        assert all("the scheduler cannot be asked" in c["reason"] for c in cells.values()), st
        launched = run(dev_cluster, "launch", *ov)  # nothing it cannot see is submitted again
        assert "submitted 0 cells" in launched.stderr and "2 queued or running" in launched.stderr, launched.stderr
    finally:
        up = subprocess.run([str(DEV_CLUSTER), "up"], env=dev_cluster.env, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
        assert up.returncode == 0, up.stdout + up.stderr
    deadline = time.monotonic() + 120
    while (st := by_recipe(dev_cluster, ov)[0])["note"] is not None:  # the controller recovers its jobs
        assert time.monotonic() < deadline, st
        time.sleep(2)
    assert set(st["counts"]) <= {"pending", "running"}, st
    assert "cancelled 2 job(s)" in run(dev_cluster, "cancel", *ov).stderr
