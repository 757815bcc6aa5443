"""A cell that asks for 4 GPUs, sent through the project's SLURM dispatch to the dev cluster, whose node
declares 4 GPUs: one node, 4 GPUs allocated, and the job sees 4 devices. (The dev cluster's GPUs are
declared, not real, so the cell itself trains on the CPU.)"""

import time

import pytest

from tests.test_campaign_slurm import cli, job_records, status, wait_idle

pytestmark = pytest.mark.slurm


def test_a_four_gpu_cell_runs_on_one_node_and_sees_four_devices(dev_cluster, tmp_path):
    name = "multi_gpu"
    ov = ["campaign=smoke", "cluster=dev", f"results_dir={tmp_path}", f"campaign.name={name}",
          "campaign.models=[tiny-llama]", "campaign.recipes=[aletheia]", "campaign.seeds=[42]", "train.steps=2",
          "model.resources.gpus=4", "model.resources.cpus=1", "model.resources.mem_gb=4"]
    cli(dev_cluster, "launch", *ov)
    wait_idle(dev_cluster, f"aletheia-{name}", 240)
    assert status(dev_cluster, ov)["counts"] == {"done": 1}

    job = job_records(tmp_path, name)[-1]
    deadline = time.monotonic() + 30
    while True:  # accounting lags the controller by a moment
        alloc = dev_cluster.run(["sacct", "-n", "-X", "-P", "-j", job["array_job_id"],
                                 "-o", "AllocTRES,NNodes"]).stdout.strip()
        if "gres/gpu=" in alloc or time.monotonic() > deadline:
            break
        time.sleep(1)
    tres, nodes = alloc.split("|")
    assert "gres/gpu=4" in tres.split(",") and nodes == "1", alloc

    logs = (tmp_path / name / "cells" / job["cell_id"] / "logs").glob("slurm-*.log")
    worker_log = "\n".join(p.read_text() for p in logs)
    assert "model.resources.gpus=4, CUDA_VISIBLE_DEVICES=0,1,2,3" in worker_log, worker_log[-2000:]
