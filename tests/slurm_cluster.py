"""Session fixture for the project's multi-node SLURM dev cluster (``slurm/dev-cluster``).

Use it from ``tests/conftest.py``::

    from tests.slurm_cluster import dev_cluster  # noqa: F401

The fixture runs ``slurm/dev-cluster up`` once per session, points ``SLURM_CONF`` (in
``os.environ`` too, so code under test such as submitit finds the cluster) at the cluster's
config, and at the end runs ``slurm/dev-cluster down`` only if this session was the one that
brought the cluster up.  Set ``ALETHEIA_SKIP_SLURM=1`` to skip the tests that need it; without
that, a cluster that does not start is a test error, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from aletheia_hpc.provenance import REPO_ROOT

DEV_CLUSTER = REPO_ROOT / "slurm" / "dev-cluster"
DEFAULT_STATE_DIR = Path("/tmp/aletheia-slurm")

TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


@dataclass(frozen=True)
class DevCluster:
    """What a test needs to talk to the dev cluster."""

    state_dir: Path
    slurm_conf: Path
    env: dict[str, str] = field(repr=False)  # os.environ + SLURM_CONF, for subprocess(env=...)
    started_here: bool = False

    def nodes(self) -> dict[str, int]:
        """Each node's declared GPUs, as the controller has them: {"node1": 1, ..., "node3": 4}."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N|%G"]).stdout
        return {name: int(gres.rsplit(":", 1)[1].split("(")[0])
                for name, gres in (line.split("|") for line in sorted(set(out.splitlines())))}

    def node_states(self) -> dict[str, str]:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N|%T"]).stdout
        return dict(line.split("|") for line in set(out.splitlines()))

    def kill_node(self, node: str) -> None:
        """SIGKILL every process of NODE (slurmd, job steps, jobs), as a node losing power; the
        controller notices within SlurmdTimeout. ``restart_nodes`` brings it back."""
        proc = _script("kill-node", self.env, timeout=60, args=[node])
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def stop_controller(self) -> None:
        """Stop slurmctld by its recorded PID (``slurm/dev-cluster stop-ctld``): the nodes and their
        jobs keep running, squeue/sbatch fail, sacct still answers. ``restart_nodes`` starts it again."""
        proc = _script("stop-ctld", self.env, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def restart_nodes(self) -> None:
        """``slurm/dev-cluster up``: start whatever is not running (a killed node's slurmd, a stopped
        controller) and wait
        until every node is idle again."""
        proc = _script("up", self.env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (sinfo, sbatch, ...) against this cluster."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str) -> str:
        """Submit with sbatch --parsable; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args]).stdout.strip()
        return out.split(";")[0]

    def job_states(self, job_id: str) -> dict[str, str]:
        """State of each job (array task) of JOB_ID as the controller sees it.

        Keys are the job ids as squeue/scontrol print them ("12", "12_0", ...).
        """
        proc = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        states: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            fields = dict(
                kv.split("=", 1) for kv in line.split() if "=" in kv
            )
            jid = fields.get("JobId", "")
            if fields.get("ArrayJobId") and fields.get("ArrayTaskId"):
                jid = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            if jid:
                states[jid] = fields.get("JobState", "")
        return states

    def wait_state(self, job_id: str, states: set[str] | frozenset[str], timeout: float = 30):
        """Poll until every job/task of JOB_ID is in one of STATES; returns the state map."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.job_states(job_id)
            if seen and all(s in states for s in seen.values()):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout}s: {seen}")

    def wait_done(self, job_id: str, timeout: float = 30) -> dict[str, str]:
        return self.wait_state(job_id, TERMINAL_STATES, timeout)

    def sacct_states(self, job_id: str) -> dict[str, str]:
        """Allocation-level states from accounting (sacct -X), keyed by JobID."""
        out = self.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"]).stdout
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def _script(verb: str, env: dict[str, str], timeout: float,
            args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEV_CLUSTER), verb, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def dev_cluster() -> Iterator[DevCluster]:
    if os.environ.get("ALETHEIA_SKIP_SLURM") == "1":
        pytest.skip("ALETHEIA_SKIP_SLURM=1: the dev SLURM cluster is not started in this run")

    state_dir = Path(os.environ.get("ALETHEIA_SLURM_STATE") or DEFAULT_STATE_DIR)
    slurm_conf = state_dir / "etc" / "slurm.conf"
    env = dict(os.environ)
    env["SLURM_CONF"] = str(slurm_conf)

    was_up = _script("status", env, timeout=60).returncode == 0
    up = _script("up", env, timeout=900)
    if up.returncode != 0:
        if not was_up:  # stop whatever this failed start left running
            _script("down", env, timeout=300)
        pytest.fail(
            f"slurm/dev-cluster up failed (exit {up.returncode}); set ALETHEIA_SKIP_SLURM=1 to "
            f"skip SLURM tests.\n--- stdout ---\n{up.stdout}\n--- stderr ---\n{up.stderr}",
            pytrace=False,
        )

    cluster = DevCluster(
        state_dir=state_dir, slurm_conf=slurm_conf, env=env, started_here=not was_up
    )
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(slurm_conf)
    try:
        yield cluster
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if cluster.started_here:
            down = _script("down", env, timeout=300)
            if down.returncode != 0:
                # do not hide the tests' own outcome; leave a trace for the log
                print(f"slurm/dev-cluster down failed:\n{down.stdout}\n{down.stderr}")
