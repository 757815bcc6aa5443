"""A cell gets what it asks for or is refused. At plan/launch time when the cluster can never give it
(GPUs on a local machine without them; more GPUs, CPUs or memory than a SLURM node has; fp16 where
the GPUs are only declared), and in the worker when a GPU cell lands where no CUDA device is
visible. Only a cluster marked ``cpu_fallback`` (the dev cluster, whose GPUs are declared but not
real) lets such a cell train on the CPU.

This machine has no NVIDIA driver; where a test needs one to be seen, a stand-in ``nvidia-smi`` on
PATH prints the listing format of the real tool."""

import json
import os
import re
import stat
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
import torch

from aletheia_hpc.campaign.local import GpuPool, visible_gpus
from aletheia_hpc.campaign.matrix import compose_root, placement_problem
from aletheia_hpc.config import ModelConfig, ResourcesConfig
from aletheia_hpc.models.loading import DeviceError, check_device_support
from aletheia_hpc.provenance import REPO_ROOT
from aletheia_hpc.worker.cell import run_cell
from tests.test_worker import make_cell

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def fake_driver(tmp_path, monkeypatch):
    """Put an ``nvidia-smi`` that lists ``n`` GPUs first on PATH; returns a setter for n."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"

    def show(n: int) -> None:
        lines = "".join(f'echo "GPU {i}: NVIDIA A100-SXM4-64GB (UUID: GPU-{i:08d})"\n' for i in range(n))
        tool.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 9\n{lines}")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return show


def test_visible_gpus_counts_the_driver_listing_narrowed_by_cuda_visible_devices(fake_driver, monkeypatch):
    fake_driver(4)
    assert visible_gpus() == 4
    for mask, expected in (("1,3", 2), ("", 0), ("-1", 0), ("0,-1,2", 1), ("0,1,2,3,4,5", 4)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
        assert visible_gpus() == expected, mask
    monkeypatch.setenv("PATH", "/nonexistent")
    assert visible_gpus() == 0


def test_the_worker_refuses_a_gpu_cell_on_a_machine_without_cuda():
    cfg = ModelConfig(name="m", family="llama", num_layers=2, precision="bf16", resources=ResourcesConfig(gpus=1))
    with pytest.raises(DeviceError, match="model.resources.gpus=1 but no CUDA GPU is visible"):
        check_device_support(cfg, cuda_devices=0, bf16_supported=False)
    check_device_support(cfg, cuda_devices=0, bf16_supported=False, cpu_fallback=True)
    check_device_support(cfg, cuda_devices=1, bf16_supported=True)


@no_cuda
def test_a_gpu_cell_that_lands_on_a_cpu_fails_before_loading_unless_the_cluster_allows_it(tmp_path):
    cell = make_cell("model=tiny-llama", "recipe=aletheia", "model.resources.gpus=1")
    with pytest.raises(DeviceError):
        run_cell(cell, tmp_path / "refused", progress=False)
    failed = json.loads(next((tmp_path / "refused").rglob("row.json")).read_text())
    assert failed["status"] == "failed" and "no CUDA GPU is visible" in failed["failure_reason"]
    assert failed["train_steps"] == 0 and failed["model_load_time_s"] is None

    ok = run_cell(cell, tmp_path / "fallback", progress=False, cpu_fallback=True)
    assert ok["status"] == "ok" and ok["device"] == "cpu" and ok["train_steps"] == cell.train.steps


def test_plan_time_gpu_count_checks_per_cluster_kind():
    root = compose_root(["model=tiny-llama", "recipe=standard", "model.resources.gpus=4"])
    cell = make_cell("model=tiny-llama", "recipe=standard", "model.resources.gpus=4")
    local = root.cluster
    assert local.kind == "local" and local.gpus_per_node == -1  # counted at plan time
    assert "this machine shows 0" in placement_problem(cell, replace(local, gpus_per_node=0))
    assert "this machine shows 2" in placement_problem(cell, replace(local, gpus_per_node=2))
    assert placement_problem(cell, replace(local, gpus_per_node=4)) is None
    dev = compose_root(["cluster=dev", "model=tiny-llama", "recipe=standard"]).cluster
    assert dev.cpu_fallback and placement_problem(cell, dev) is None
    eight = make_cell("model=tiny-llama", "recipe=standard", "model.resources.gpus=8")
    assert "dev nodes have 4" in placement_problem(eight, dev)  # declared GPUs are still counted
    assert placement_problem(make_cell("model=tiny-llama", "recipe=standard"), replace(local, gpus_per_node=0)) is None


@pytest.mark.parametrize("override, message", [
    ("model.resources.cpus=8", "asks for model.resources.cpus=8 but dev nodes have 2"),
    ("model.resources.mem_gb=120", "asks for model.resources.mem_gb=120 but dev nodes have 16 GB"),
    ("model.precision=fp16", "model.precision=fp16 on dev, whose GPUs are declared but not real"),
])
def test_slurm_nodes_bound_cpus_memory_and_declared_gpus(override, message):
    dev = compose_root(["cluster=dev", "model=tiny-llama", "recipe=standard"]).cluster
    cell = make_cell("model=tiny-llama", "recipe=standard", "model.resources.gpus=1", override)
    assert message in placement_problem(cell, dev)
    assert placement_problem(make_cell("model=tiny-llama", "recipe=standard", "model.resources.gpus=1"), dev) is None
    unsized = replace(dev, cpus_per_node=0, mem_gb_per_node=0)  # a profile that does not say: not checked
    big = make_cell("model=tiny-llama", "recipe=standard", "model.resources.cpus=64", "model.resources.mem_gb=999")
    assert placement_problem(big, unsized) is None


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, env=env)


def test_plan_and_launch_on_a_machine_without_the_gpus_refuse_before_anything_runs(tmp_path, fake_driver):
    ov = ["campaign=smoke", "campaign.models=[tiny-llama]", "campaign.seeds=[1]", "model.resources.gpus=1",
          f"results_dir={tmp_path / 'results'}"]
    fake_driver(0)
    planned = _cli("plan", *ov, env=os.environ)
    assert planned.returncode == 2, planned.stderr
    assert "2 cells on cluster local" in planned.stdout  # the plan is still shown
    assert "2 cell(s) cannot run as asked on cluster local" in planned.stderr
    assert "this machine shows 0; launch it on a SLURM cluster" in planned.stderr
    launched = _cli("launch", *ov, env=os.environ)
    assert launched.returncode == 2 and "cannot run as asked" in launched.stderr, launched.stderr
    assert not (tmp_path / "results").exists()
    run = _cli("run-cell", "model=tiny-llama", "model.resources.gpus=1", f"results_dir={tmp_path / 'results'}",
               env=os.environ)
    assert run.returncode == 2 and "this machine shows 0" in run.stderr, run.stderr
    assert not (tmp_path / "results").exists()

    fake_driver(1)  # the same campaign on a machine with one GPU passes the check
    assert _cli("plan", *ov, env=os.environ).returncode == 0


def test_the_gpu_pool_hands_each_running_cell_its_own_devices():
    pool = GpuPool(["0", "1", "2"])
    first, second = pool.acquire(2), pool.acquire(1)
    assert first == ["0", "1"] and second == ["2"] and pool.acquire(4) == [] and pool.acquire(0) == []
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(2)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # nothing free: it waits
    pool.release(first)
    waiter.join(5)
    assert got == [["0", "1"]]


def test_parallel_local_cells_run_on_gpus_of_their_own(tmp_path, fake_driver):
    fake_driver(2)
    results = tmp_path / "results"
    ov = ["campaign=smoke", "campaign.models=[tiny-llama]", "campaign.seeds=[1]", "model.resources.gpus=1",
          "cluster.local_workers=2", "cluster.cpu_fallback=true", "train.steps=2", "progress=false",
          f"results_dir={results}"]
    launched = _cli("launch", *ov, env=os.environ)
    assert launched.returncode == 0, launched.stderr[-2000:]
    logs = [p.read_text() for p in (results / "smoke").glob("cells/*/logs/local-*.log")]
    seen = sorted(re.search(r"CUDA_VISIBLE_DEVICES=([^,\s]+)", text).group(1) for text in logs)
    assert seen == ["0", "1"], seen
