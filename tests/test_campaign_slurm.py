"""SLURM dispatch of campaigns (aletheia_hpc/campaign/slurm.py) against the real dev cluster.

Golden sbatch scripts need no cluster; everything else uses the ``dev_cluster`` fixture.
Regenerate the golden files with ``ALETHEIA_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from aletheia_hpc.campaign.matrix import expand
from aletheia_hpc.campaign.slurm import resource_class, sbatch_script
from aletheia_hpc.provenance import REPO_ROOT


GOLDEN = Path(__file__).parent / "golden"


# ------------------------------------------------------------------ golden sbatch scripts (no cluster)

@pytest.mark.parametrize("name, overrides", [
    ("dev_tiny_llama", ["campaign=smoke", "campaign.models=[tiny-llama]", "cluster=dev"]),
    ("leonardo_mixtral_8x7b", ["campaign=smoke", "campaign.models=[mixtral-8x7b]", "cluster=leonardo"]),
    ("leonardo_site_options", ["campaign=smoke", "campaign.models=[qwen2.5-7b]", "cluster=leonardo",
                               "cluster.sbatch.constraint=gpu64g", "cluster.sbatch.gres_type=a100",
                               "cluster.sbatch.exclusive=true", "cluster.sbatch.reservation=aletheia_rsv",
                               "cluster.sbatch.mail_type='END,FAIL'", "cluster.sbatch.mail_user=ops@example.org",
                               "cluster.sbatch.extra=['--hint=nomultithread','--comment=aletheia paper']"]),
])
def test_golden_sbatch(name, overrides):
    plan = expand(overrides)
    cell = plan.cells[0]
    cls = resource_class(cell, plan.root.cluster)
    script = sbatch_script(cls, plan.root.cluster, "<SNAPSHOT>", "/RESULTS/smoke/submitit/%j", n_tasks=1,
                           job_name="aletheia-smoke", python="<PYTHON>")
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("ALETHEIA_UPDATE_GOLDEN") == "1":
        path.write_text(script)
    assert script == path.read_text()
    if "mixtral" in name:
        assert "#SBATCH --gres=gpu:4" in script and "#SBATCH --nodes=1" in script
        assert "#SBATCH --cpus-per-task=32" in script and "#SBATCH --mem=480GB" in script
    assert "#SBATCH --signal=USR2@" in script and "USR1" not in script
    if name == "leonardo_site_options":
        for line in ("#SBATCH --constraint=gpu64g", "#SBATCH --gres=gpu:a100:1", "#SBATCH --exclusive",
                     "#SBATCH --reservation=aletheia_rsv", "#SBATCH --mail-type=END,FAIL",
                     "#SBATCH --mail-user=ops@example.org", "#SBATCH --hint=nomultithread"):
            assert line in script.splitlines(), line


@pytest.mark.parametrize("override, message", [
    ("cluster.sbatch.mail_type=NEVER", "cluster.sbatch.mail_type='NEVER': NEVER not one of"),
    ("cluster.sbatch.extra=['--time=10']", "--time is set by the dispatcher"),
    ("cluster.sbatch.extra=['hint nomultithread']", "write one long option"),
    ("cluster.sbatch.gres_type=a100:2", "the type only (e.g. a100)"),
    ("cluster.sbatch.constraint='a100 x'", "cluster.sbatch.constraint='a100 x': no spaces"),
])
def test_bad_sbatch_options_stop_the_plan_naming_the_field(override, message):
    proc = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "plan", "campaign=default", "cluster=leonardo",
                           "cluster.sbatch.mail_user=ops@example.org", override], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_plan_sbatch_prints_every_class_script_and_submits_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "plan", "--sbatch", "campaign=paper",
                           "cluster=leonardo", f"results_dir={tmp_path}", "cluster.sbatch.gres_type=a100"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scripts = proc.stdout.split("# ---- ")[1:]
    plan = expand(["campaign=paper", "cluster=leonardo"])
    groups = {(c.campaign, resource_class(c, plan.root.cluster)) for c in plan.cells}
    assert len(scripts) == len(groups) and all("#SBATCH --job-name=aletheia-paper_c" in s for s in scripts)
    assert sum(int(s.split(":", 1)[1].split()[0]) for s in scripts) == len(plan.cells)
    assert "#SBATCH --gres=gpu:a100:4" in proc.stdout  # the 4-GPU Mixtral/70B classes
    assert not any(tmp_path.iterdir())


def test_array_script_has_throttle():
    plan = expand(["campaign=smoke", "campaign.models=[tiny-llama]", "cluster=dev"])
    script = sbatch_script(resource_class(plan.cells[0], plan.root.cluster), plan.root.cluster, "/s",
                           "/f/%j", n_tasks=4)
    assert "#SBATCH --array=0-3%2" in script


# ------------------------------------------------------------------ real cluster

def cli(cluster, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], env=cluster.env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"aletheia-hpc {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def status(cluster, overrides) -> dict:
    out = json.loads(cli(cluster, "status", *overrides, "--json").stdout)
    out["by_key"] = {(c["recipe"], c["seed"]): c for c in out["cells"]}
    return out


def queued(cluster, job_name: str) -> list[str]:
    out = cluster.run(["squeue", "-h", "-n", job_name, "-o", "%i %T"]).stdout
    return out.split("\n") if out.strip() else []


def wait_idle(cluster, job_name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while queued(cluster, job_name):
        assert time.monotonic() < deadline, f"jobs still queued after {timeout}s: {queued(cluster, job_name)}"
        time.sleep(1)


def wait_settled(cluster, job_name: str, overrides, timeout: float) -> dict:
    """Wait until the queue is empty and the project's own status (files, then sacct) has no cell
    pending or running, e.g. none caught between a requeue and its next start; returns that status."""
    deadline = time.monotonic() + timeout
    wait_idle(cluster, job_name, timeout)
    while True:
        st = status(cluster, overrides)
        busy = [c for c in st["cells"] if c["state"] in ("pending", "running")]
        if not busy and not queued(cluster, job_name):
            return st
        assert time.monotonic() < deadline, f"cells still busy after {timeout}s: {busy}"
        time.sleep(2)


def rows(results: Path, campaign: str) -> dict[str, Path]:
    return {p.parent.name: p for p in (results / campaign / "cells").glob("*/row.json")}


def job_records(results: Path, campaign: str) -> list[dict]:
    """Every job record of the campaign part's cells (each cell keeps its own jobs.jsonl)."""
    return [json.loads(line) for p in sorted((results / campaign / "cells").glob("*/jobs.jsonl"))
            for line in p.read_text().splitlines()]


@pytest.mark.slurm
def test_smoke_end_to_end(dev_cluster, tmp_path):
    ov = ["campaign=smoke", "cluster=dev", f"results_dir={tmp_path}", "campaign.name=smoke_e2e",
          "campaign.models=[tiny-llama]", "train.steps=3"]
    cli(dev_cluster, "launch", *ov)
    wait_idle(dev_cluster, "aletheia-smoke_e2e", 150)
    st = status(dev_cluster, ov)
    assert st["counts"] == {"done": 4}, st
    assert len(rows(tmp_path, "smoke_e2e")) == 4
    snap = next((tmp_path / "smoke_e2e" / "snapshots").iterdir())
    assert (snap / ".snapshot-git-sha").read_text().strip()
    assert (snap / "aletheia_hpc" / "worker" / "__main__.py").exists()
    # launching again submits nothing: every cell is done
    again = cli(dev_cluster, "launch", *ov)
    assert "submitted 0 cells" in again.stderr


@pytest.mark.slurm
def test_faults_status_and_resubmit(dev_cluster, tmp_path):
    name = "smoke_faults"
    faults = ("+campaign.faults={tiny-llama/standard/42:{raise_on_attempt:1},"
              "tiny-llama/standard/123:{nan_at_step:2,sleep_per_step_s:8},"
              "tiny-llama/aletheia/42:{sleep_per_step_s:6},"
              "tiny-llama/aletheia/123:{sleep_per_step_s:3}}")
    ov = ["campaign=smoke", "cluster=dev", f"results_dir={tmp_path}", f"campaign.name={name}",
          "campaign.models=[tiny-llama]", "campaign.seeds=[42,123,7]", "train.steps=10",
          "train.checkpoint_every=2", "model.resources.time_min=1", faults]
    job_name = f"aletheia-{name}"
    cli(dev_cluster, "launch", *ov)
    jobs = job_records(tmp_path, name)
    assert len({j["array_job_id"] for j in jobs}) == 1  # one sbatch for the one resource class
    by_cell = {j["cell_id"]: j for j in jobs}
    plan = expand(ov)
    cell_of = {(c.recipe.name, c.seed): c.cell_id for c in plan.cells}
    victim = by_cell[cell_of["aletheia", 123]]["job_id"]
    # cancel the slow aletheia/123 cell mid-training (after it checkpointed at least once)
    ckpt = tmp_path / name / "cells" / cell_of["aletheia", 123] / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpt.exists() and any(ckpt.iterdir())):
        assert time.monotonic() < deadline, "the cell to cancel never checkpointed"
        time.sleep(0.5)
    dev_cluster.run(["scancel", victim])
    st = wait_settled(dev_cluster, job_name, ov, 240)
    c = st["by_key"]
    assert c["standard", 42]["state"] == "failed" and "InjectedFault" in c["standard", 42]["reason"]
    assert c["standard", 123]["state"] == "nan_abort" and c["standard", 123]["reason"].startswith("nan_abort")
    # a nan_abort cell exits non-zero: the scheduler records its job FAILED
    nan_job = by_cell[cell_of["standard", 123]]["job_id"]
    assert dev_cluster.sacct_states(nan_job).get(nan_job) == "FAILED"
    assert c["aletheia", 123]["state"] == "failed" and c["aletheia", 123]["reason"].startswith("CANCELLED")
    for key in (("aletheia", 42), ("standard", 7), ("aletheia", 7)):
        # on failure, show every task's scheduler record: this check has failed once, cause unknown
        assert c[key]["state"] == "done", (key, c[key].get("reason"), dev_cluster.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State,ExitCode,Elapsed,Start,End", "--name", job_name],
            check=False).stdout)
    timeout_row = json.loads(rows(tmp_path, name)[cell_of["aletheia", 42]].read_text())
    assert timeout_row["attempts"] >= 2 and timeout_row["train_steps"] == 10, timeout_row["attempts"]
    # every step's time is carried across the requeue: 10 steps of at least the 6 s injected sleep
    assert len(timeout_row["step_times_s"]) == 10 and timeout_row["train_time_s"] >= 60, timeout_row["step_times_s"]

    ok_before = {cid: (p.stat().st_ino, p.stat().st_mtime_ns) for cid, p in rows(tmp_path, name).items()
                 if json.loads(p.read_text())["status"] == "ok"}
    assert len(ok_before) == 3
    out = cli(dev_cluster, "resubmit", *ov)
    # the failed cells only: a nan_abort (a deterministic overflow) is left alone unless asked
    assert "submitted 2 cells" in out.stderr and "1 nan_abort left alone" in out.stderr, out.stderr
    # everything failed is now queued or running: nothing to do
    again = cli(dev_cluster, "resubmit", *ov)
    assert "submitted 0 cells" in again.stderr, again.stderr
    st = wait_settled(dev_cluster, job_name, ov, 180)
    assert st["counts"] == {"done": 5, "nan_abort": 1}, st
    retry = cli(dev_cluster, "resubmit", "--retry-nan", *ov)  # the flag before the overrides
    assert "submitted 1 cells" in retry.stderr, retry.stderr
    st = wait_settled(dev_cluster, job_name, ov, 180)
    assert st["counts"] == {"done": 5, "nan_abort": 1}, st
    assert st["by_key"]["standard", 123]["reason"].startswith("nan_abort")  # fails again, by design
    for cid, (ino, mtime) in ok_before.items():
        p = rows(tmp_path, name)[cid]
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == (ino, mtime), cid
    for cell_dir in (tmp_path / name / "cells").iterdir():
        assert len(list(cell_dir.glob("row.json"))) == 1
    resumed = json.loads(rows(tmp_path, name)[cell_of["aletheia", 123]].read_text())
    assert resumed["status"] == "ok" and resumed["attempts"] >= 2

    # --force reruns an ok cell and keeps its old row aside
    ok_id = cell_of["standard", 7]
    old_row = json.loads(rows(tmp_path, name)[ok_id].read_text())
    cli(dev_cluster, "resubmit", *ov, "--force", ok_id)
    assert list((tmp_path / name / "cells" / ok_id).glob("row.json.replaced-*"))
    assert wait_settled(dev_cluster, job_name, ov, 90)["counts"] == {"done": 5, "nan_abort": 1}
    rerun = json.loads(rows(tmp_path, name)[ok_id].read_text())
    # a forced rerun starts from scratch: its own attempt, all 10 steps trained (and timed) again
    assert rerun["attempts"] == 1 and len(rerun["step_times_s"]) == 10
    assert rerun["step_times_s"] != old_row["step_times_s"] and rerun["started_at"] > old_row["finished_at"]


@pytest.mark.slurm
def test_bad_matrix_submits_nothing(dev_cluster, tmp_path):
    ov = ["campaign=smoke", "cluster=dev", f"results_dir={tmp_path}", "campaign.name=smoke_bad",
          "recipe.attention_rank=0"]
    for verb in ("plan", "launch"):
        proc = cli(dev_cluster, verb, *ov, check=False)
        assert proc.returncode == 2 and "invalid cell" in proc.stderr, proc.stderr
    assert queued(dev_cluster, "aletheia-smoke_bad") == []
    assert not (tmp_path / "smoke_bad").exists()


@pytest.mark.slurm
def test_a_job_accounting_never_heard_of_is_pending_only_for_a_grace_period(dev_cluster, tmp_path):
    ov = ["campaign=default", "cluster=dev", f"results_dir={tmp_path}", "campaign.name=lost_jobs"]
    plan = expand(ov)
    cells_dir = tmp_path / "lost_jobs" / "cells"
    now = time.time()
    # job ids this cluster has never issued, as left by a wiped cluster or a results dir moved from another
    records = [{"cell_id": c.cell_id, "job_id": f"{9_000_000 + i}_0", "array_job_id": str(9_000_000 + i),
                "task": 0, "snapshot": "", "submitted_at": submitted, "cluster": "dev"}
               for i, (c, submitted) in enumerate(zip(plan.cells, (now - 3600, now)))]
    write_jobs(cells_dir, records)
    by_recipe = {c["recipe"]: c for c in status(dev_cluster, ov)["cells"]}
    lost, fresh = (by_recipe[c.recipe.name] for c in plan.cells)
    assert lost["state"] == "missing" and "unknown to this cluster's accounting 60 min" in lost["reason"]
    assert fresh["state"] == "pending" and "not yet in accounting" in fresh["reason"]
    out = cli(dev_cluster, "cancel", *ov)  # the fresh one is "queued": cancelling it is no error
    assert "cancelled 1 job(s)" in out.stderr, out.stderr

    # the same directory with the fresh job recorded on another cluster: not asked about here
    records[1]["cluster"] = "leonardo"
    write_jobs(cells_dir, records)
    moved = {c["recipe"]: c for c in status(dev_cluster, ov)["cells"]}[plan.cells[1].recipe.name]
    assert moved["state"] == "missing" and "ran on cluster leonardo, not dev" in moved["reason"]


def write_jobs(cells_dir: Path, records: list[dict]) -> None:
    for rec in records:
        (cells_dir / rec["cell_id"]).mkdir(parents=True, exist_ok=True)
        (cells_dir / rec["cell_id"] / "jobs.jsonl").write_text(json.dumps(rec) + "\n")


@pytest.mark.slurm
def test_arrays_are_split_at_max_array_size(dev_cluster, tmp_path):
    name = "split"
    ov = ["campaign=default", "cluster=dev", f"results_dir={tmp_path}", f"campaign.name={name}",
          "campaign.seeds=[1,2,3]", "campaign.noop=true", "cluster.max_array_size=4"]
    out = cli(dev_cluster, "launch", *ov)
    assert "submitted 6 cells as 2 job array(s) in 1 resource class(es)" in out.stderr, out.stderr
    jobs = job_records(tmp_path, name)
    sizes = sorted(Counter(j["array_job_id"] for j in jobs).values())
    assert sizes == [2, 4], jobs
    wait_idle(dev_cluster, f"aletheia-{name}", 300)
    assert status(dev_cluster, ov)["counts"] == {"done": 6}
