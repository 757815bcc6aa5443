"""Planning at scale: compositions cached in the campaign directory give the cells Hydra gives, with
the same ids; the cache follows every config file it depends on."""

import json
import re
import shutil

import pytest

import aletheia_hpc.campaign.matrix as matrix
from aletheia_hpc.campaign.matrix import PLAN_CACHE_DIR, expand, option_names
from aletheia_hpc.config import plain
from aletheia_hpc.provenance import REPO_ROOT

# The cell ids of the paper's campaigns as the code before the plan cache composed them (their rows
# exist on clusters: an id that changes orphans a finished row).
GOLDEN_IDS = json.loads((REPO_ROOT / "tests" / "golden" / "campaign_cell_ids.json").read_text())


@pytest.fixture
def hydra_composes(monkeypatch):
    """How many times planning asked Hydra to compose (what the cache saves)."""
    calls = []
    real = matrix.compose_root

    def counted(overrides):
        calls.append(list(overrides))
        return real(overrides)

    monkeypatch.setattr(matrix, "compose_root", counted)
    return calls


@pytest.mark.parametrize("campaign", option_names("campaign"))
def test_planning_again_from_the_cache_gives_hydras_cells_and_ids(campaign, tmp_path, hydra_composes):
    overrides = [f"campaign={campaign}", f"results_dir={tmp_path}"]
    cold = expand(overrides)
    composed_cold = len(hydra_composes)
    hydra_composes.clear()
    warm = expand(overrides)
    parts = cold.root.campaign.parts or [campaign]
    assert [c.cell_id for c in warm.cells] == [c.cell_id for c in cold.cells]
    assert [plain(c) for c in warm.cells] == [plain(c) for c in cold.cells]  # every field, typed alike
    assert [type(c.model.lr) for c in warm.cells] == [type(c.model.lr) for c in cold.cells]
    # only each campaign root is composed again (it says where the cache is)
    assert len(hydra_composes) == 1 + (len(parts) if cold.root.campaign.parts else 0) < composed_cold
    for part in parts:
        assert len(list((tmp_path / part / PLAN_CACHE_DIR).glob("*.json"))) == 1
    if campaign in GOLDEN_IDS:
        assert [c.cell_id for c in cold.cells] == GOLDEN_IDS[campaign]


def test_editing_a_config_file_composes_again(tmp_path, monkeypatch, hydra_composes):
    conf = tmp_path / "conf"
    shutil.copytree(REPO_ROOT / "conf", conf)
    monkeypatch.setenv("ALETHEIA_CONF", str(conf))
    overrides = ["campaign=smoke", f"results_dir={tmp_path / 'results'}"]
    before = expand(overrides)
    edited = before.cells[0].model.name
    model = conf / "model" / f"{edited}.yaml"
    model.write_text(re.sub(r"(?m)^lr: .*$", "lr: 0.000123", model.read_text()))
    hydra_composes.clear()
    after = expand(overrides)
    assert len(hydra_composes) > 1
    changed = [(a.model.lr, a.cell_id != b.cell_id) for a, b in zip(after.cells, before.cells)
               if a.model.name == edited]
    assert changed and set(changed) == {(0.000123, True)}
    assert [a.cell_id for a in after.cells if a.model.name != edited] == \
        [b.cell_id for b in before.cells if b.model.name != edited]
    assert len(list((tmp_path / "results" / "smoke" / PLAN_CACHE_DIR).glob("*.json"))) == 1  # the old one went


def test_a_torn_cache_or_one_that_cannot_be_written_is_composed_around(tmp_path, hydra_composes):
    overrides = ["campaign=smoke", f"results_dir={tmp_path}"]
    ids = [c.cell_id for c in expand(overrides).cells]
    (cache,) = (tmp_path / "smoke" / PLAN_CACHE_DIR).glob("*.json")
    cache.write_text(cache.read_text()[:100])
    hydra_composes.clear()
    assert [c.cell_id for c in expand(overrides).cells] == ids and len(hydra_composes) > 1
    json.loads(cache.read_text())  # written whole again
    shutil.rmtree(cache.parent)
    cache.parent.write_text("")  # where the cache would go, something that cannot hold it
    assert [c.cell_id for c in expand(overrides).cells] == ids
