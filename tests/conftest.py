import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The paper's tables, in the shared/ folder laid beside every checkout (CI's fresh clone too).
SHARED_PAPER = ROOT.parent / "shared" / "paper"
# Derived artefacts (tokenizer, converted models) go to a cache the suite shares across runs.
os.environ.setdefault("ALETHEIA_CACHE", str(ROOT / ".cache"))
# The suite runs offline: nothing in it (nor the cells it starts) reaches for a hub, whatever
# packages are installed; tests that exercise the hub decision set their own endpoint.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

pytest_plugins = ["tests.slurm_cluster"]


def probe_batches(n=3, batch=2, length=12, seed=0, pad_last=True):
    """Random token batches; the first sequence of the first batch ends in padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, 512, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad_last and i == 0:
            mask[0, length - 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture
def batches():
    return probe_batches()


def race_processes(child_source: str, args: list[str], tmp_path: Path, n: int, *, start_timeout: float,
                   run_timeout: float) -> list[dict]:
    """Run ``n`` Python processes of ``child_source`` (argv: ``args``, then its ready file and the shared
    go file), release them at once when all are ready, and return each one's last stdout line as JSON."""
    import json
    import subprocess
    import time

    from aletheia_hpc.provenance import REPO_ROOT

    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    children = [subprocess.Popen([sys.executable, "-c", child_source, *args, str(tmp_path / f"ready{i}"), str(go)],
                                 cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(n)]
    try:
        deadline = time.monotonic() + start_timeout
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert time.monotonic() < deadline, "children did not start"
            assert all(c.poll() is None for c in children), [c.communicate() for c in children]
            time.sleep(0.01)
        go.touch()  # release all of them at once
        outputs = [c.communicate(timeout=run_timeout) for c in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert all(c.returncode == 0 for c in children), [err[-2000:] for _, err in outputs]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def pytest_collection_modifyitems(config, items):
    """Every test of the SLURM dev cluster carries the slurm marker (scripts/test.sh runs them in a
    session of their own, beside the rest: the cluster's daemons, ports and state exist once)."""
    for item in items:
        if "dev_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
