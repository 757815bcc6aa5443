"""Prefetch and the offline preflight, with the real huggingface_hub client against a stand-in hub on
127.0.0.1 (tests/hub_standin.py) serving a tiny llama the test writes.

In order: a launch before prefetch runs nothing; prefetch fetches each file once and writes a verified,
pinned manifest; a second prefetch asks the hub for nothing; a connection dropped mid-file is resumed
(HTTP Range) and a killed prefetch's partial file is never taken as complete; with the hub stopped, a
cell loads the pinned commit from the cache and trains, its worker under the offline switches. On the
dev cluster, a campaign whose hub model is not fetched submits nothing and names it; after prefetch the
same launch runs with the hub stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aletheia_hpc.campaign.matrix import expand
from aletheia_hpc.campaign.preflight import check_inputs, hub_setup_lines, nominal_bytes, plan_warnings
from aletheia_hpc.config import ClusterConfig, ConfigError, validate_cluster
from aletheia_hpc.models.prefetch import campaign_inputs, manifest_path
from aletheia_hpc.provenance import REPO_ROOT
from tests.hub_standin import StandInHub

REPO = "aletheia-test/tiny-llama"
# the tiny llama of model=tiny-llama, as a hub model; two training steps, no benchmarks
CAMPAIGN = ["campaign=default", "campaign.recipes=[standard]", "model.kind=hub",
            f"model.path={REPO}", "cluster.compute_offline=true", "train.steps=2", "train.warmup_steps=0",
            "data.builtin_size=80", "data.eval_size=8"]


# The client resumes a broken download from the last 10 MiB chunk it wrote (huggingface_hub's
# DOWNLOAD_CHUNK_SIZE): the stand-in's weights are made larger than that with embedding rows the
# tokenizer never uses (24.6 MB in all), so that a drop at 15 MB leaves something to resume from.
VOCAB_ROWS = 48_000
DROP_AT = 15_000_000


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """The files of the stand-in's model repo: a tiny llama's weights, config and tokenizer."""
    from transformers import AutoModelForCausalLM

    from aletheia_hpc.models.tiny import tiny_config
    from aletheia_hpc.models.tokenizer import tiny_tokenizer

    source = tmp_path_factory.mktemp("repo")
    config = tiny_config("llama", 6)
    config.vocab_size = VOCAB_ROWS
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    return source


def start_hub(source: Path) -> StandInHub:
    server = StandInHub().start()
    server.add_repo(REPO, source)
    return server


@pytest.fixture(scope="module")
def hub(tiny_repo):
    server = start_hub(tiny_repo)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One site's hub cache and results directory, shared by the ordered tests below."""
    root = tmp_path_factory.mktemp("site")
    return {"hf": root / "hf", "results": root / "results"}


def overrides(site, *extra) -> list[str]:
    return [*CAMPAIGN, "campaign.name=offline", f"results_dir={site['results']}", f"cluster.hf_home={site['hf']}",
            *extra]


def operator_env(base: dict, hub) -> dict:
    """``base`` as an operator's shell has it: the stand-in's endpoint, none of the suite's offline switches
    and no HF_HOME (the compute_offline profile must set them for the jobs itself)."""
    env = {k: v for k, v in base.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")}
    env.update(HF_ENDPOINT=hub.endpoint, PYTHONPATH=str(REPO_ROOT))
    return env


def cli(hub, *args, base=None, timeout=300, wait=True):
    """The CLI in a fresh process, as an operator runs it (operator_env of ``base``, default os.environ)."""
    env = operator_env(os.environ if base is None else base, hub)
    command = [sys.executable, "-m", "aletheia_hpc.cli", *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def file_gets(hub) -> list[tuple[str, str | None]]:
    """(file, Range header) of every file download the hub answered."""
    return [(path.rsplit("/", 1)[1], rng) for method, path, rng in hub.requests("GET", "/resolve/")]


def read_manifest(site) -> dict:
    return json.loads(manifest_path(site["results"] / "offline").read_text())


def assert_verified(entry: dict, hub) -> None:
    """Every file of the manifest entry is the hub's, byte for byte (sha256 of what the hub served)."""
    repo = hub.repos[REPO]
    assert entry["revision"] == repo.sha and entry["requested_revision"] == "main"
    expected = {n: hashlib.sha256(d).hexdigest() for n, d in repo.files.items() if n != "README.md"}
    assert {f["path"]: f["sha256"] for f in entry["files"]} == expected
    assert entry["bytes"] == sum(len(repo.files[n]) for n in expected)


def test_launch_before_prefetch_refuses_and_runs_nothing(hub, site):
    proc = cli(hub, "launch", *overrides(site))
    assert proc.returncode == 2, proc.stderr
    assert f"hub model {REPO} (tiny-llama): not prefetched" in proc.stderr
    assert "aletheia-hpc prefetch campaign=default" in proc.stderr and "needed by 1 cell(s)" in proc.stderr
    assert not (site["results"] / "offline" / "cells").exists()  # no cell directory, no snapshot, no job
    plan = cli(hub, "plan", *overrides(site))
    assert plan.returncode == 0 and f"inputs:   hub model {REPO} (tiny-llama): not prefetched" in plan.stdout


def test_prefetch_fetches_every_file_once_and_pins_the_commit(hub, site):
    hub.log.clear()
    proc = cli(hub, "prefetch", *overrides(site))
    assert proc.returncode == 0, proc.stderr
    files = sorted(n for n in hub.repos[REPO].files if n != "README.md")
    assert sorted(name for name, _ in file_gets(hub)) == files  # each once; the README is not a model file
    entry = read_manifest(site)["inputs"][f"model:{REPO}"]
    assert_verified(entry, hub)
    snapshot = site["hf"] / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / entry["revision"]
    assert sorted(p.name for p in snapshot.iterdir()) == files
    assert "preflight: every input of the 1 cells is where the jobs will read it" in proc.stderr


def test_second_prefetch_asks_the_hub_for_nothing(hub, site):
    before = read_manifest(site)
    hub.log.clear()
    proc = cli(hub, "prefetch", *overrides(site))
    assert proc.returncode == 0, proc.stderr
    assert hub.log == [] and "already fetched" in proc.stderr
    assert read_manifest(site)["inputs"] == before["inputs"]


def test_a_dropped_connection_resumes_where_it_broke_off(hub, tmp_path):
    other = {"hf": tmp_path / "hf", "results": tmp_path / "results"}
    assert len(hub.repos[REPO].files["model.safetensors"]) > DROP_AT
    hub.drop_once("model.safetensors", after=DROP_AT)
    hub.log.clear()
    proc = cli(hub, "prefetch", *overrides(other))
    assert proc.returncode == 0, proc.stderr
    first, second = [rng for name, rng in file_gets(hub) if name == "model.safetensors"]
    assert first is None and second.startswith("bytes=") and 0 < int(second[6:].rstrip("-")) <= DROP_AT, second
    assert_verified(read_manifest(other)["inputs"][f"model:{REPO}"], hub)


def test_a_killed_prefetch_leaves_nothing_taken_as_complete(hub, tmp_path):
    other = {"hf": tmp_path / "hf", "results": tmp_path / "results"}
    hub.stalled.clear()
    hub.stall_once("model.safetensors", after=1000)
    proc = cli(hub, "prefetch", *overrides(other), wait=False)
    try:
        assert hub.stalled.wait(120), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGKILL)  # as a node or an operator may: no clean-up runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    blobs = site_blobs(other)
    assert [p for p in blobs if p.name.endswith(".incomplete")], blobs  # the partial download, left behind
    plan = expand(overrides(other))
    missing = check_inputs(plan.cells, plan.root.cluster, other["results"])
    assert [m.input.key for m in missing] == [f"model:{REPO}"] and "not prefetched" in missing[0].reason
    again = cli(hub, "prefetch", *overrides(other))
    assert again.returncode == 0, again.stderr
    assert_verified(read_manifest(other)["inputs"][f"model:{REPO}"], hub)
    assert check_inputs(plan.cells, plan.root.cluster, other["results"]) == []


def site_blobs(site) -> list[Path]:
    return sorted((site["hf"] / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir())


def test_with_the_hub_stopped_a_cell_trains_from_the_cache_offline(hub, site):
    hub.stop()
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(hub.endpoint.rsplit(":", 1)[1])), timeout=2).close()
    # gsm8k from eval.source=auto: its row says which switch kept the worker off the hub
    proc = cli(hub, "launch", *overrides(site, "eval.benchmarks=[gsm8k]", "eval.gsm8k_n=2",
                                         "eval.gsm8k_max_new_tokens=4"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(next((site["results"] / "offline" / "cells").glob("*/row.json")).read_text())
    assert row["status"] == "ok" and row["train_steps"] == 2
    assert row["model_revision"] == read_manifest(site)["inputs"][f"model:{REPO}"]["revision"]
    assert "HF_HUB_OFFLINE is set" in row["eval_source"]["gsm8k"]


# ------------------------------------------------------------------ no hub needed

def test_inputs_are_listed_once_per_distinct_model_and_data_set():
    plan = expand(["campaign=paper", "cluster=leonardo"])
    inputs = campaign_inputs(plan.cells)
    models = {c.model.path for c in plan.cells}
    assert len(plan.cells) == 128 and len(inputs) == len(models) + 3  # + mmlu, gsm8k, humaneval from the hub
    assert sum(i.n_cells for i in inputs if i.kind == "hub_model") == 128
    from aletheia_hpc.evaluation.data import HUB_IDS

    for name, (repo, _, _) in HUB_IDS.items():
        listed = [i for i in inputs if i.kind == "hub_dataset" and i.repo == repo]
        needing = sum(name in c.eval.benchmarks for c in plan.cells)
        # a benchmark no cell runs (the paper's campaigns do not run the multiple-choice sets) is not listed
        assert [i.n_cells for i in listed] == ([needing] if needing else []), name


def test_the_disk_estimate_is_two_bytes_a_parameter():
    assert nominal_bytes("72B") == 144 * 10 ** 9 and nominal_bytes("135M") == 270 * 10 ** 6
    assert nominal_bytes("tiny") is None


def test_plan_estimates_the_paper_campaigns_download_once_per_model(tmp_path):
    plan = expand(["campaign=paper", "cluster=leonardo", f"cluster.hf_home={tmp_path / 'hf'}",
                   f"results_dir={tmp_path}"])
    lines = plan_warnings(plan)
    # 15 distinct hub models, 243 B parameters in all (each counted once, though two are in both parts)
    disk = next(line for line in lines if "disk:" in line)
    assert f"about 485.8 GB of model weights (2 bytes per parameter) into {tmp_path / 'hf' / 'hub'}" in disk
    assert sum(1 for line in lines if "hub model Qwen/Qwen2.5-7B" in line) == 1  # one line for both parts
    assert lines[-1].startswith(f"inputs: fix: aletheia-hpc prefetch campaign=paper cluster=leonardo")


@pytest.mark.parametrize("params, fits", [("135M", True), ("9000T", False)])
def test_plan_says_when_the_cache_file_system_is_too_small(tmp_path, params, fits):
    plan = expand([*CAMPAIGN, f"model.params={params}", f"results_dir={tmp_path}", f"cluster.hf_home={tmp_path}"])
    disk = next(line for line in plan_warnings(plan) if "disk:" in line)
    assert ("NOT ENOUGH" not in disk) == fits, disk


def test_offline_jobs_get_the_switches_and_the_sites_cache():
    lines = hub_setup_lines(ClusterConfig(kind="slurm", compute_offline=True, hf_home="$WORK/hf-cache"))
    assert lines == ['export HF_HOME="$WORK/hf-cache"', "export HF_HUB_OFFLINE=1", "export HF_DATASETS_OFFLINE=1"]
    assert hub_setup_lines(ClusterConfig(kind="slurm")) == []


@pytest.mark.parametrize("cluster, message", [
    (ClusterConfig(kind="local", transfer_partition="serial"), "only a SLURM cluster has partitions"),
    (ClusterConfig(kind="slurm", transfer_partition="a b"), "one partition name"),
    (ClusterConfig(kind="slurm", hf_home="'/x'"), "cluster.hf_home=\"'/x'\": one directory path"),
])
def test_bad_offline_settings_name_the_field(cluster, message):
    with pytest.raises(ConfigError, match=message):
        validate_cluster(cluster)


# ------------------------------------------------------------------ the dev cluster

def screen(title: str, proc) -> None:
    """What the operator saw of one command, printed for the closing note (pytest -s shows it)."""
    print(f"$ aletheia-hpc {title}\n{proc.stdout}{proc.stderr}(exit {proc.returncode})\n")


@pytest.mark.slurm
def test_on_the_dev_cluster_offline_launch_refuses_then_runs_after_prefetch(dev_cluster, tiny_repo, tmp_path):
    """The issue's closing check: with cluster.compute_offline=true, a launch whose hub model is not fetched
    exits non-zero and queues nothing; after prefetch from the stand-in hub, the same launch, with the hub
    stopped, runs the cell to a row on the dev cluster."""
    from tests.test_campaign_slurm import wait_settled

    name = "offline_dev"
    ov = [*CAMPAIGN, "cluster=dev", f"results_dir={tmp_path}",
          f"cluster.hf_home={tmp_path / 'hf'}", f"campaign.name={name}", "eval.benchmarks=[gsm8k]", "eval.gsm8k_n=2",
          "eval.gsm8k_max_new_tokens=4"]
    job_name = f"aletheia-{name}"
    hub = start_hub(tiny_repo)
    try:
        refused = cli(hub, "launch", *ov, base=dev_cluster.env)
        screen("launch " + " ".join(ov), refused)
        assert refused.returncode == 2, refused.stderr
        assert f"hub model {REPO} (tiny-llama): not prefetched" in refused.stderr
        assert "fix: aletheia-hpc prefetch campaign=default" in refused.stderr
        squeue = dev_cluster.run(["squeue", "-h", "-o", "%i %j %T"]).stdout
        print(f"$ squeue -h -o '%i %j %T'\n{squeue}(empty: {not squeue.strip()})\n")
        assert squeue.strip() == "" and not (tmp_path / name).exists()  # nothing submitted or written
        fetched = cli(hub, "prefetch", *ov, base=dev_cluster.env)
        screen("prefetch " + " ".join(ov), fetched)
        assert fetched.returncode == 0, fetched.stderr
    finally:
        hub.stop()
    manifest = json.loads(manifest_path(tmp_path / name).read_text())
    print(f"$ cat {manifest_path(tmp_path / name)}\n{json.dumps(manifest, indent=1, sort_keys=True)}\n")
    launched = cli(hub, "launch", *ov, base=dev_cluster.env)  # HF_ENDPOINT: the stopped stand-in
    screen("launch " + " ".join(ov), launched)
    assert launched.returncode == 0, launched.stderr
    st = wait_settled(dev_cluster, job_name, ov, 400)
    print(f"status after the queue emptied: {st['counts']}")
    assert st["counts"] == {"done": 1}, st
    row = json.loads(next((tmp_path / name / "cells").glob("*/row.json")).read_text())
    assert row["status"] == "ok" and row["model_revision"] == manifest["inputs"][f"model:{REPO}"]["revision"]
    assert "HF_HUB_OFFLINE is set" in row["eval_source"]["gsm8k"]  # the job's switch, not the suite's
    print(f"row {row['cell_id']}: status {row['status']}, model_revision {row['model_revision']}, "
          f"eval_source {row['eval_source']}")
