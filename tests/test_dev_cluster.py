"""End-to-end checks of the dev SLURM cluster started by slurm/dev-cluster.

Needs the ``dev_cluster`` fixture from tests/slurm_cluster.py (imported by tests/conftest.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_every_node_is_idle_with_its_declared_gpus(dev_cluster):
    _wait_for(lambda: set(dev_cluster.node_states().values()) == {"idle"}, 20, "every node idle in sinfo")
    nodes = dev_cluster.nodes()
    n = int(os.environ.get("ALETHEIA_SLURM_NODES", "3"))
    # node1..node(N-1) declare one GPU each, the last node four
    assert nodes == {f"node{i}": 1 for i in range(1, n)} | {f"node{n}": 4}, nodes


def test_each_node_has_its_own_hostname_and_address(dev_cluster, tmp_path: Path):
    nodes = sorted(dev_cluster.nodes())
    jobs = {node: dev_cluster.sbatch("-w", node, "-o", str(tmp_path / f"{node}.out"), "--wrap",
                                     "echo $(hostname) $(ip -4 -o addr show dev eth0 | awk '{print $4}')")
            for node in nodes}
    for job in jobs.values():
        assert set(dev_cluster.wait_done(job).values()) == {"COMPLETED"}
    seen = {node: (tmp_path / f"{node}.out").read_text().split() for node in nodes}
    assert all(host == node for node, (host, _addr) in seen.items()), seen
    assert len({addr for _host, addr in seen.values()}) == len(nodes), seen


def test_max_array_size_configured(dev_cluster):
    out = dev_cluster.run(["scontrol", "show", "config"]).stdout
    values = {
        k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines())
    }
    assert values["MaxArraySize"] == "1001"
    assert values["SelectType"] == "select/cons_tres"
    assert values["JobRequeue"] == "1"


@pytest.mark.parametrize("ngpus, expected", [(4, "0,1,2,3"), (1, None)])
def test_gpu_jobs_see_their_devices(dev_cluster, tmp_path: Path, ngpus, expected):
    out = tmp_path / "gpu.out"
    job = dev_cluster.sbatch(
        f"--gres=gpu:{ngpus}", "-o", str(out), "--wrap", "echo CVD=$CUDA_VISIBLE_DEVICES"
    )
    states = dev_cluster.wait_done(job)
    assert set(states.values()) == {"COMPLETED"}, states
    line = out.read_text().strip()
    assert line.startswith("CVD="), line
    devices = line[len("CVD=") :].split(",")
    assert len(devices) == ngpus, line
    assert all(d in {"0", "1", "2", "3"} for d in devices), line
    if expected is not None:
        assert line == f"CVD={expected}"


def test_job_array_completes_and_is_accounted(dev_cluster, tmp_path: Path):
    job = dev_cluster.sbatch(
        "--array=0-2",
        "-o",
        str(tmp_path / "task_%a.out"),
        "--wrap",
        "echo task $SLURM_ARRAY_TASK_ID",
    )
    states = dev_cluster.wait_done(job)
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(3)}, states
    for i in range(3):
        assert (tmp_path / f"task_{i}.out").read_text().strip() == f"task {i}"

    # accounting lags the controller by a moment
    expected = {f"{job}_{i}": "COMPLETED" for i in range(3)}
    _wait_for(
        lambda: dev_cluster.sacct_states(job) == expected,
        20,
        f"sacct -j {job} to report {expected}",
    )


def test_requeue_of_running_job_runs_it_again(dev_cluster, tmp_path: Path):
    out = tmp_path / "requeue.out"
    job = dev_cluster.sbatch(
        "-o",
        str(out),
        "--open-mode=append",
        "--wrap",
        "echo run restarts=${SLURM_RESTART_COUNT:-0}; sleep 120",
    )
    try:
        dev_cluster.wait_state(job, {"RUNNING"}, timeout=20)
        _wait_for(lambda: out.exists() and "run restarts=0" in out.read_text(), 10, "first run")

        dev_cluster.run(["scontrol", "requeue", job])
        # a requeued batch job may start again only after AuthInfo cred_expire (10 s here)
        _wait_for(
            lambda: "run restarts=1" in out.read_text(), 40, f"job {job} to run again: {out}"
        )
        info = dev_cluster.run(["scontrol", "show", "job", "-o", job]).stdout
        assert "Restarts=1" in info, info
        assert "JobState=RUNNING" in info, info
    finally:
        dev_cluster.run(["scancel", job], check=False)
    dev_cluster.wait_done(job)
