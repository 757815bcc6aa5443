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
