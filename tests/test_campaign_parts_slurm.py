"""A campaign made of two parts (as ``paper`` is of ``paper_c1`` and ``paper_c2``), launched as one on
the dev cluster: every verb sees the cells of both parts, whose job records live with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aletheia_hpc.provenance import REPO_ROOT
from tests.test_campaign_slurm import job_records, queued, rows

pytestmark = pytest.mark.slurm

PARTS = {"duo_a": "tiny-llama", "duo_b": "tiny-qwen2"}


def two_part_conf(root: Path) -> Path:
    """The project's configs plus campaign ``duo`` = parts duo_a (tiny-llama) and duo_b (tiny-qwen2)."""
    conf = root / "conf"
    shutil.copytree(REPO_ROOT / "conf", conf)  # follows conf/campaign -> campaigns/
    (conf / "campaign" / "duo.yaml").write_text("# @package _global_\ncampaign:\n  name: duo\n"
                                                f"  parts: [{', '.join(PARTS)}]\n")
    for part, model in PARTS.items():
        (conf / "campaign" / f"{part}.yaml").write_text(
            f"# @package _global_\ncampaign:\n  name: {part}\n  models: [{model}]\n  seeds: [42]\n")
    return conf


def run(env, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"aletheia-hpc {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def status(env, ov) -> dict:
    return json.loads(run(env, "status", "--json", *ov).stdout)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(1)
    return value


def test_two_part_campaign_launch_status_cancel_resubmit(dev_cluster, tmp_path):
    env = {**dev_cluster.env, "ALETHEIA_CONF": str(two_part_conf(tmp_path))}
    # one quick cell; the three others sleep per step so that they are still queued when cancelled
    slow = ",".join(f"{key}:{{sleep_per_step_s:30}}" for key in
                    ("tiny-llama/aletheia/42", "tiny-qwen2/standard/42", "tiny-qwen2/aletheia/42"))
    # one declared GPU per cell (the dev node's GPUs are not real: cells train on the CPU), so that
    # the scheduler's accounting has GPU-hours to give
    ov = ["campaign=duo", "cluster=dev", f"results_dir={tmp_path / 'results'}", "train.steps=4",
          "model.resources.gpus=1",
          "train.checkpoint_every=2", "train.warmup_steps=1", "data.builtin_size=300", "data.eval_size=40",
          f"+campaign.faults={{{slow}}}"]
    results = tmp_path / "results"
    launched = run(env, "launch", *ov)
    assert "submitted 4 cells as 2 job array(s)" in launched.stderr, launched.stderr  # one array per part
    for part in PARTS:  # each part's cells carry their own job records
        assert len(job_records(results, part)) == 2, part
    assert not (results / "duo").exists()  # nothing is kept under the campaign's own name

    st = status(env, ov)
    assert len(st["cells"]) == 4 and {c["campaign"] for c in st["cells"]} == set(PARTS)
    assert all(c["state"] in ("pending", "running", "done") for c in st["cells"]), st["cells"]
    assert "submitted 0 cells" in run(env, "launch", *ov).stderr  # nothing runs twice

    quick = next(c["cell_id"] for c in st["cells"] if c["model"] == "tiny-llama" and c["recipe"] == "standard")
    wait_for(lambda: {c["cell_id"]: c["state"] for c in status(env, ov)["cells"]}[quick] == "done", 400,
             "the quick cell to finish")
    done_row = rows(results, "duo_a")[quick].stat()
    cancelled = run(env, "cancel", *ov)
    assert "cancelled 3 job(s)" in cancelled.stderr, cancelled.stderr
    wait_for(lambda: not any(queued(dev_cluster, f"aletheia-{p}") for p in PARTS), 60, "the queue to empty")
    st = wait_for(lambda: (s := status(env, ov))["counts"] == {"done": 1, "failed": 3} and s, 30,
                  "status to show the cancelled cells")
    assert all(c["reason"].startswith("CANCELLED") for c in st["cells"] if c["state"] == "failed"), st["cells"]

    again = run(env, "resubmit", *ov)
    assert "submitted 3 cells as 2 job array(s)" in again.stderr, again.stderr
    wait_for(lambda: status(env, ov)["counts"] == {"done": 4}, 900, "every cell to be done")
    for part in PARTS:
        for cell_dir in (results / part / "cells").iterdir():
            assert len(list(cell_dir.glob("row.json"))) == 1, cell_dir
            row = json.loads((cell_dir / "row.json").read_text())
            assert row["status"] == "ok" and row["cell_id"] == cell_dir.name and row["campaign"] == part
    after = rows(results, "duo_a")[quick].stat()
    assert (after.st_ino, after.st_mtime_ns) == (done_row.st_ino, done_row.st_mtime_ns)  # not run again
    assert len(job_records(results, "duo_a")) + len(job_records(results, "duo_b")) == 7  # 4 + 3 resubmitted

    # the scheduler's accounting of every job, kept beside the row, from the one sacct call of status
    st = status(env, ov)
    for c in st["cells"]:
        acct = json.loads((results / c["campaign"] / "cells" / c["cell_id"] / "accounting.json").read_text())
        usage = acct["jobs"][c["job_id"]]
        assert usage["alloc_gpus"] == 1 and usage["alloc_cpus"] == 1 and usage["elapsed_s"] > 0, acct
        # a resubmitted cell's cancelled job counts too if it had started: those hours were spent
        recorded = {j["job_id"] for j in job_records(results, c["campaign"]) if j["cell_id"] == c["cell_id"]}
        assert set(acct["jobs"]) <= recorded and (c["cell_id"] != quick or len(acct["jobs"]) == 1), acct
        assert acct["gpu_hours"] == pytest.approx(sum(u["elapsed_s"] for u in acct["jobs"].values()) / 3600)
        assert c["gpu_hours"] == pytest.approx(acct["gpu_hours"])
    per_arm = st["cost"]["per_arm"]  # status: what the campaign has spent so far, per arm
    assert {a: v["cells"] for a, v in per_arm.items()} == {"standard": 2, "aletheia": 2}
    assert sum(v["gpu_hours"] for v in per_arm.values()) == pytest.approx(sum(c["gpu_hours"] for c in st["cells"]))
    assert "GPU-hours so far (scheduler accounting): aletheia=" in run(env, "status", *ov).stdout
    # aggregate reads the same figures from the accounting.json files the last status wrote, no
    # scheduler needed (each status refreshes them: a job's elapsed time can still grow between two),
    # and pairs them: what Aletheia saved per part, in stats.json, REPORT.md and the printed summary
    latest = status(env, ov)["cells"]
    printed = run(env, "aggregate", *ov).stdout
    for part in PARTS:
        spent = {c["recipe"]: c["gpu_hours"] for c in latest if c["campaign"] == part}
        cost = json.loads((results / part / "stats.json").read_text())["cost"]
        assert {a: v["gpu_hours"] for a, v in cost["per_arm"].items()} == pytest.approx(spent), part
        saved = cost["saved"]["aletheia"]["overall"]
        assert saved["n_pairs"] == 1, saved
        assert saved["saved_gpu_hours"] == pytest.approx(spent["standard"] - spent["aletheia"])
        assert f"Aletheia saved {saved['saved_gpu_hours']:.3f} over 1 pair(s), probe included" in printed, printed
        assert f"**Aletheia saved {saved['saved_gpu_hours']:.3f} GPU-hours" in (results / part / "REPORT.md").read_text()
