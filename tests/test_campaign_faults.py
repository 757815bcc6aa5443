"""Campaigns on the multi-node dev cluster (slurm/dev-cluster: node1..node(N-1) with 1 GPU, the last
node with 4) through the faults a real cluster has: where cells land, a node that dies while its cell
trains, a preemption by the higher-priority partition, a controller restart, and the transient
states a requeued or held job passes through. Each test ends with every cell done once: no row lost,
none written twice, every row that was finished before the fault untouched."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from aletheia_hpc.campaign.matrix import expand
from aletheia_hpc.campaign.slurm import earlier_runs, fill_from_queue, job_runs
from aletheia_hpc.campaign.state import ACTIVE, BUSY, ENDED, cell_state
from tests.test_campaign_slurm import cli, job_records, rows, status, wait_settled

# ------------------------------------------------------------------ transient states (no cluster)

# every job state SLURM 22.05's squeue and sacct print (slurm/src/common/slurm_protocol_defs.c)
SLURM_JOB_STATES = ("PENDING", "RUNNING", "SUSPENDED", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL",
                    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "CONFIGURING", "COMPLETING", "REQUEUED",
                    "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "RESV_DEL_HOLD", "REVOKED", "SIGNALING",
                    "SPECIAL_EXIT", "STAGE_OUT", "STOPPED")
JOB = {"job_id": "7_0", "array_job_id": "7", "submitted_at": 1000.0, "cluster": "dev"}


@pytest.mark.parametrize("sched", [*SLURM_JOB_STATES, "POWER_UP_NODE", "UNKNOWN"])
@pytest.mark.parametrize("source", ["sacct", "squeue"])
def test_no_scheduler_state_makes_a_cell_missing_and_a_queued_one_is_never_run_again(sched, source):
    got = cell_state("c0ffee0000000001", None, None, JOB, sched, source, 1010.0, "dev")
    assert got.state != "missing" and got.reason and "job 7_0" in got.reason, got
    if sched in ACTIVE:  # queued, held, requeued, running: not to be submitted again
        assert got.state in BUSY, got
    elif sched not in ENDED:  # a state this tool does not know: left alone rather than run twice
        assert got.state == "unknown" and sched in got.reason, got
    else:
        assert got.state == "failed" and got.reason.startswith(sched), got
    assert set(SLURM_JOB_STATES) == set(ACTIVE) | ENDED, "a SLURM state without a rule"


def test_a_job_slurm_requeued_is_queued_though_accounting_still_has_its_lost_run():
    # accounting has recorded how the run on node1 ended, not yet that the job is queued again
    accounting = {"7_0": "NODE_FAIL", "7_1": "PREEMPTED", "7_2": "NODE_FAIL", "7_3": "COMPLETED"}
    queue = {"7_0": "PENDING", "7_1": "REQUEUED"}
    states = fill_from_queue(accounting, list(accounting), lambda: queue)
    assert states == {"7_0": "PENDING", "7_1": "REQUEUED", "7_2": "NODE_FAIL", "7_3": "COMPLETED"}
    runs = job_runs("7_0|NODE_FAIL|41|cpu=1,gres/gpu=1,node=1||node1\n7_1|PREEMPTED|12|cpu=1,node=1||node2\n"
                    "7_2|NODE_FAIL|9|cpu=1,node=1||node1\n")
    assert earlier_runs(runs, ["7_0", "7_1"]) == {"7_0": ["NODE_FAIL on node1"], "7_1": ["PREEMPTED on node2"]}


def test_earlier_runs_of_a_requeued_job_are_named_with_their_node():
    out = ("7_0|NODE_FAIL|41|cpu=1,gres/gpu=1,node=1||node1\n7_0.batch|CANCELLED|41|cpu=1||node1\n"
           "7_0|PREEMPTED|12|cpu=1,gres/gpu=1,node=1||node3\n7_0|PENDING|0|||None assigned\n"
           "7_1|COMPLETED|9|cpu=1,node=1||node2\n7_[2-3]|PENDING|0|||None assigned\n")
    assert earlier_runs(job_runs(out)) == {"7_0": ["NODE_FAIL on node1", "PREEMPTED on node3"]}


# ------------------------------------------------------------------ helpers

def overrides(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["campaign=default", "cluster=dev", f"results_dir={tmp_path}", f"campaign.name={name}", *extra]


def cell_ids(ov: list[str]) -> dict[tuple[str, int], str]:
    return {(c.arm, c.seed): c.cell_id for c in expand(ov).cells}


def cell_dir(tmp_path: Path, name: str, cell_id: str) -> Path:
    return tmp_path / name / "cells" / cell_id


def read_json(path: Path) -> dict | list:
    return json.loads(path.read_text())


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)
    return value


def progress_step(work: Path) -> int:
    try:
        return int(read_json(work / "progress.json").get("step", 0))
    except (OSError, ValueError):
        return 0


def node_of(cluster, job_id: str) -> str:
    """The node a running job (array task ``A_T``) holds, from the controller."""
    out = cluster.run(["squeue", "-h", "-j", job_id, "-t", "RUNNING", "-o", "%N"], check=False).stdout.strip()
    return out if out and out != "(null)" else ""


def finished_rows(tmp_path: Path, name: str) -> dict[str, tuple[int, int, str]]:
    """cell id -> (inode, mtime, content) of every ok row: what a fault must leave untouched."""
    out = {}
    for cid, p in rows(tmp_path, name).items():
        text = p.read_text()
        if json.loads(text)["status"] == "ok":
            out[cid] = (p.stat().st_ino, p.stat().st_mtime_ns, text)
    return out


def assert_every_cell_done_once(cluster, tmp_path: Path, name: str, ov: list[str], before: dict) -> dict:
    """No row lost (every cell done), none duplicated (one row file and one job record per cell:
    nothing submitted twice), the rows finished before the fault untouched, and a launch now
    submits nothing. Returns the status."""
    st = status(cluster, ov)
    plan = expand(ov)
    assert st["counts"] == {"done": len(plan.cells)}, st
    for cell in plan.cells:
        work = cell_dir(tmp_path, name, cell.cell_id)
        assert [p.name for p in work.glob("row.json*")] == ["row.json"], cell.cell_id
        assert len((work / "jobs.jsonl").read_text().splitlines()) == 1, cell.cell_id
    now = finished_rows(tmp_path, name)
    for cid, (ino, mtime, text) in before.items():
        assert now[cid] == (ino, mtime, text), f"finished row of {cid} was rewritten"
    again = cli(cluster, "launch", *ov)
    assert "submitted 0 cells" in again.stderr, again.stderr
    return st


def assert_resumed_elsewhere(work: Path, lost_node: str, progress_then: dict, steps: int) -> dict:
    """The cell's row is ok after two attempts, the second on another node than ``lost_node``, and it
    resumed from the checkpoint of step 2: the step times measured before the fault are carried, not
    trained again."""
    row = read_json(work / "row.json")
    attempts = read_json(work / "attempts.json")
    nodes = [a["slurm"].get("node") for a in attempts]
    assert row["status"] == "ok" and row["attempts"] == 2 and len(attempts) == 2, (row["attempts"], attempts)
    assert nodes[0] == lost_node and nodes[1] not in (None, lost_node), nodes
    assert row["slurm"]["node"] == row["host"] == nodes[1], (row["slurm"], row["host"])
    assert row["train_steps"] == steps and len(row["step_times_s"]) == steps, row["step_times_s"]
    assert row["step_times_s"][:2] == progress_then["step_times_s"][:2], (row["step_times_s"], progress_then)
    return row


# ------------------------------------------------------------------ placement

@pytest.mark.slurm
def test_cells_spread_over_nodes_and_the_four_gpu_cell_lands_on_the_four_gpu_node(dev_cluster, tmp_path):
    nodes = dev_cluster.nodes()
    assert len(nodes) >= 2, f"the placement test needs >= 2 nodes: {nodes}"
    big = max(nodes, key=nodes.get)
    name = "placement"
    # one cell per node at a time (each asks for every CPU of a node): two cells running at once
    # are on two nodes; the 'wide' variant's cells ask for 4 GPUs, which only the big node has
    ov = overrides(tmp_path, name, "campaign.noop=true", "campaign.seeds=[1,2]", "model.resources.gpus=1",
                   "model.resources.cpus=2", "campaign.variants=[{name:matched},"
                   "{name:wide,recipes:[aletheia],steps:5,overrides:['model.resources.gpus=4']}]")
    out = cli(dev_cluster, "launch", *ov)
    assert "submitted 6 cells as 2 job array(s) in 2 resource class(es)" in out.stderr, out.stderr
    wait_settled(dev_cluster, f"aletheia-{name}", ov, 240)
    st = assert_every_cell_done_once(dev_cluster, tmp_path, name, ov, {})

    placed = {}
    for c in st["cells"]:
        row = read_json(cell_dir(tmp_path, name, c["cell_id"]) / "row.json")
        # the row records the node: SLURM's node name, which is also the node's own hostname
        assert row["slurm"]["node"] == row["host"] and row["host"] in nodes, (row["slurm"], row["host"])
        placed[c["cell_id"]] = (c["arm"], row["host"])
    for job in job_records(tmp_path, name):  # and the scheduler agrees on where each cell ran
        acct = dev_cluster.run(["sacct", "-n", "-X", "-P", "-j", job["job_id"], "-o", "NodeList"]).stdout.split()
        assert acct == [placed[job["cell_id"]][1]], (job, acct)
    assert {node for arm, node in placed.values() if arm == "aletheia@wide"} == {big}, placed
    assert len({node for _arm, node in placed.values()}) >= 2, placed


# ------------------------------------------------------------------ a node dies

SLOW_CELL_STEPS = 8


def launch_with_a_slow_cell(dev_cluster, tmp_path, name):
    """Launch standard and aletheia at seed 42, the standard cell slow enough to be hit mid-training
    (the aletheia one finishes first); (overrides, the slow cell's directory, its job id)."""
    ov = overrides(tmp_path, name, f"train.steps={SLOW_CELL_STEPS}", "train.checkpoint_every=2",
                   "model.resources.gpus=1", "+campaign.faults={tiny-llama/standard/42:{sleep_per_step_s:4}}")
    slow_id = cell_ids(ov)["standard", 42]
    cli(dev_cluster, "launch", *ov)
    job = {j["cell_id"]: j for j in job_records(tmp_path, name)}[slow_id]["job_id"]
    return ov, cell_dir(tmp_path, name, slow_id), job


def wait_past_first_checkpoint(tmp_path, name, victim) -> dict:
    """Past step 2, so the slow cell's first checkpoint is whole; the other cell done, so there is a
    row to keep: the finished rows then."""
    wait_for(lambda: progress_step(victim) >= 3 and finished_rows(tmp_path, name), 240,
             "the slow cell past its first checkpoint and the other cell done")
    return finished_rows(tmp_path, name)

@pytest.mark.slurm
def test_a_cell_on_a_node_that_dies_fails_over_and_resumes_from_its_checkpoint(dev_cluster, tmp_path):
    name = "node_loss"
    ov, victim, job = launch_with_a_slow_cell(dev_cluster, tmp_path, name)
    try:
        before = wait_past_first_checkpoint(tmp_path, name, victim)
        node = wait_for(lambda: node_of(dev_cluster, job), 30, f"the node of job {job}")
        dev_cluster.kill_node(node)
        progress_then = read_json(victim / "progress.json")
        assert progress_then["step"] < SLOW_CELL_STEPS, progress_then

        # the controller notices (SlurmdTimeout): the job ends NODE_FAIL and is requeued; status says so
        def says_node_failed():
            cell = status(dev_cluster, ov)["by_key"]["standard", 42]
            return cell if f"NODE_FAIL on {node}" in (cell["reason"] or "") else None
        cell = wait_for(says_node_failed, 150, f"status to name the failure of {node}", every=2)
        assert cell["state"] in ("pending", "running"), cell
        wait_settled(dev_cluster, f"aletheia-{name}", ov, 240)
    finally:
        dev_cluster.restart_nodes()
    assert_every_cell_done_once(dev_cluster, tmp_path, name, ov, before)
    assert_resumed_elsewhere(victim, node, progress_then, SLOW_CELL_STEPS)
    runs = dev_cluster.run(["sacct", "-n", "-X", "-P", "-D", "-j", job, "-o", "State,NodeList"]).stdout.split()
    assert runs[0] == f"NODE_FAIL|{node}" and runs[-1].startswith("COMPLETED|"), runs


# ------------------------------------------------------------------ a preemption

@pytest.mark.slurm
def test_a_preempted_cell_is_requeued_and_resumes_from_its_checkpoint(dev_cluster, tmp_path):
    name = "preemption"
    ov, victim, job = launch_with_a_slow_cell(dev_cluster, tmp_path, name)
    urgent = []
    try:
        before = wait_past_first_checkpoint(tmp_path, name, victim)
        node = wait_for(lambda: node_of(dev_cluster, job), 30, f"the node of job {job}")
        progress_then = read_json(victim / "progress.json")
        # every GPU of every node, in the higher-priority partition: the cell's GPU is taken from it
        # (PreemptMode=REQUEUE), and it waits in the queue until these end
        urgent = [dev_cluster.sbatch("-p", "urgent", "-w", n, f"--gres=gpu:{g}", "-o", "/dev/null", "--wrap", "sleep 40")
                  for n, g in dev_cluster.nodes().items()]

        def says_preempted():
            cell = status(dev_cluster, ov)["by_key"]["standard", 42]
            return cell if f"PREEMPTED on {node}" in (cell["reason"] or "") and cell["state"] == "pending" else None
        cell = wait_for(says_preempted, 60, "status to say the cell waits after a preemption", every=1)
        assert cell["job_id"] == job, cell
        wait_settled(dev_cluster, f"aletheia-{name}", ov, 300)
    finally:
        if urgent:
            dev_cluster.run(["scancel", *urgent], check=False)
    assert_every_cell_done_once(dev_cluster, tmp_path, name, ov, before)
    row = read_json(victim / "row.json")
    assert row["status"] == "ok" and row["attempts"] == 2, row["attempts"]
    assert row["train_steps"] == SLOW_CELL_STEPS and len(row["step_times_s"]) == SLOW_CELL_STEPS, row["step_times_s"]
    assert row["step_times_s"][:2] == progress_then["step_times_s"][:2], (row["step_times_s"], progress_then)
    runs = dev_cluster.run(["sacct", "-n", "-X", "-P", "-D", "-j", job, "-o", "State,NodeList"]).stdout.split()
    assert runs[0] == f"PREEMPTED|{node}" and runs[-1].startswith("COMPLETED|"), runs


# ------------------------------------------------------------------ the controller restarts

@pytest.mark.slurm
def test_a_controller_restart_mid_campaign_keeps_a_true_view_and_submits_nothing_twice(dev_cluster, tmp_path):
    name = "ctld_restart"
    # four cells, two at a time (the dev cluster's array_parallelism): some run, some wait, when the
    # controller goes away
    slow = ",".join(f"tiny-llama/{recipe}/{seed}:{{sleep_per_step_s:5}}" for recipe in ("standard", "aletheia")
                    for seed in (1, 2))
    ov = overrides(tmp_path, name, "train.steps=3", "campaign.seeds=[1,2]", f"+campaign.faults={{{slow}}}")
    cli(dev_cluster, "launch", *ov)
    try:
        wait_for(lambda: any(progress_step(cell_dir(tmp_path, name, cid)) >= 1 for cid in cell_ids(ov).values()),
                 240, "a cell training")
        before = finished_rows(tmp_path, name)
        dev_cluster.stop_controller()
        assert dev_cluster.run(["squeue"], check=False).returncode != 0  # the controller is gone
        # accounting still answers: every cell is done, queued or running, none missing or failed
        st = status(dev_cluster, ov)
        assert set(st["counts"]) <= {"done", "pending", "running"} and st["counts"].get("done", 0) < 4, st["counts"]
        again = cli(dev_cluster, "launch", *ov)  # nothing is submitted (sbatch would fail anyway)
        assert "submitted 0 cells" in again.stderr, again.stderr
    finally:
        dev_cluster.restart_nodes()  # starts slurmctld again: it reloads its jobs from StateSaveLocation
    st = status(dev_cluster, ov)
    assert set(st["counts"]) <= {"done", "pending", "running"}, st["counts"]
    wait_settled(dev_cluster, f"aletheia-{name}", ov, 300)
    assert_every_cell_done_once(dev_cluster, tmp_path, name, ov, before)
