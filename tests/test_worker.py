"""One cell end to end on tiny models: real probe, real LoRA training, real rows on disk."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aletheia_hpc.campaign.matrix import compose_root
from aletheia_hpc.config import CellConfig, FaultConfig
from aletheia_hpc.models.tiny import TINY_FAMILIES
from aletheia_hpc.row import read_row
from aletheia_hpc.campaign.store import PROGRESS_FILE, cell_path
from aletheia_hpc.worker.cell import run_cell
from aletheia_hpc.worker.stop import StopSignal
from aletheia_hpc.worker.training import StopForRequeue

FAST = ["train.steps=8", "train.warmup_steps=1", "train.checkpoint_every=4", "data.builtin_size=240",
        "data.eval_size=32", "progress=false"]


def make_cell(*overrides, faults=FaultConfig()):
    root = compose_root(list(FAST) + list(overrides))
    return CellConfig(campaign=root.campaign.name, model=root.model, recipe=root.recipe, train=root.train,
                      data=root.data, eval=root.eval, seed=root.seed, variant=root.variant, faults=faults)


def _base_eval_loss(tmp_path, model):
    return run_cell(make_cell(f"model={model}", "recipe=base"), tmp_path, progress=False)["eval_loss"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_aletheia_cell_trains_and_lowers_the_held_out_loss(tmp_path, family):
    model = f"tiny-{family.replace('_', '')}"
    cell = make_cell(f"model={model}", "recipe=aletheia", "model.lr=5e-3")
    row = run_cell(cell, tmp_path, progress=False)
    on_disk = read_row(tmp_path / cell.campaign / "cells" / cell.cell_id / "row.json")
    assert on_disk == json.loads(json.dumps(row))
    assert row["status"] == "ok" and row["train_steps"] == 8 and len(row["step_times_s"]) == 8
    assert len(row["layer_scores"]) == 6 and len(row["selected_layers"]) == 3
    assert row["selected_layers"] == sorted(row["selected_layers"])
    assert row["probe_time_s"] > 0 and row["train_time_s"] > 0
    assert row["eval_loss"] < _base_eval_loss(tmp_path, model)


def test_standard_cell_adapts_every_layer_and_skips_the_probe(tmp_path):
    row = run_cell(make_cell("model=tiny-qwen2", "recipe=standard"), tmp_path, progress=False)
    assert row["selected_layers"] == list(range(6))
    assert row["layer_scores"] is None and row["probe_time_s"] is None
    aletheia = run_cell(make_cell("model=tiny-qwen2", "recipe=aletheia"), tmp_path, progress=False)
    assert aletheia["trainable_params"] == row["trainable_params"] // 2


def test_the_probe_definition_a_recipe_asks_for_is_the_one_that_runs_and_is_recorded(tmp_path):
    """recipe.probe.norm / loss_tokens / batch_size reach the probe: the authors' definition (per-tensor
    norms summed, every token, one sequence per batch) scores differently from ours, and the row says which."""
    ours = run_cell(make_cell("model=tiny-llama", "recipe=aletheia", "train.steps=1"), tmp_path / "a", progress=False)
    theirs = run_cell(make_cell("model=tiny-llama", "recipe=aletheia", "train.steps=1", "recipe.probe.norm=tensor_sum",
                                "recipe.probe.loss_tokens=all", "recipe.probe.batch_size=1"), tmp_path / "b",
                      progress=False)
    assert ours["probe"] == {"norm": "layer", "loss_tokens": "response", "batch_size": 4, "batches": 5,
                             "mode": "single_pass"}
    assert theirs["probe"] == {"norm": "tensor_sum", "loss_tokens": "all", "batch_size": 1, "batches": 5,
                               "mode": "single_pass"}
    assert len(theirs["layer_scores"]) == 6 and theirs["layer_scores"] != ours["layer_scores"]
    assert ours["arm"] == theirs["arm"] == "aletheia"


def test_non_finite_loss_aborts_at_once_with_nan_abort(tmp_path):
    cell = make_cell("model=tiny-llama", "recipe=aletheia", faults=FaultConfig(nan_at_step=3))
    row = run_cell(cell, tmp_path, progress=False)
    assert row["status"] == "nan_abort" and row["nan_step"] == 3
    assert "non-finite" in row["failure_reason"]
    assert read_row(tmp_path / cell.campaign / "cells" / cell.cell_id / "row.json")["status"] == "nan_abort"


def test_an_exception_leaves_a_failed_row_and_is_raised(tmp_path):
    cell = make_cell("model=tiny-llama", "recipe=standard", faults=FaultConfig(raise_on_attempt=1))
    with pytest.raises(RuntimeError, match="fault injected"):
        run_cell(cell, tmp_path, progress=False)
    row = read_row(tmp_path / cell.campaign / "cells" / cell.cell_id / "row.json")
    assert row["status"] == "failed" and "InjectedFault" in row["failure_reason"]
    # the second attempt succeeds and replaces the failed row
    assert run_cell(cell, tmp_path, progress=False)["attempts"] == 2


def _stopped_attempt(tmp_path, cell, match: str | None = None) -> Path:
    """Run one attempt of ``cell`` whose stop was requested before it began (as when SIGUSR2 comes
    during loading): it stops for requeue after its first optimizer step. Returns the cell's dir."""
    stop = StopSignal()
    stop.request()
    with pytest.raises(StopForRequeue, match=match):
        run_cell(cell, tmp_path, stop=stop, progress=False)
    return cell_path(tmp_path, cell)


def test_a_stop_request_checkpoints_and_the_next_attempt_resumes_with_every_step_time(tmp_path):
    cell = make_cell("model=tiny-llama", "recipe=aletheia")  # 8 steps
    work = _stopped_attempt(tmp_path, cell)
    assert not (work / "row.json").exists() and (work / "checkpoints" / "checkpoint-1").is_dir()
    first = json.loads((work / PROGRESS_FILE).read_text())["step_times_s"]
    assert len(first) == 1
    row = run_cell(cell, tmp_path, progress=False)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["train_steps"] == 8
    assert len(row["step_times_s"]) == 8 and row["step_times_s"][0] == first[0]
    assert row["train_time_s"] == pytest.approx(sum(row["step_times_s"]))
    assert row["gpu_name"] is None and row["device"] == "cpu"  # every step ran here
    assert json.loads((work / PROGRESS_FILE).read_text())["step_hardware"] == ["cpu"] * 8


def test_a_cell_requeued_onto_other_hardware_says_so_in_its_row(tmp_path):
    cell = make_cell("model=tiny-llama", "recipe=standard")
    progress = _stopped_attempt(tmp_path, cell) / PROGRESS_FILE
    saved = json.loads(progress.read_text())
    # as the file reads when the first attempt ran on a GPU node (no GPU here to run it on)
    progress.write_text(json.dumps({**saved, "step_hardware": ["NVIDIA A100-SXM4-64GB"]}))
    row = run_cell(cell, tmp_path, progress=False)
    assert row["status"] == "ok" and row["gpu_name"] == "NVIDIA A100-SXM4-64GB + cpu"


def test_a_stop_during_evaluation_keeps_the_training_and_the_next_attempt_only_evaluates(tmp_path):
    one_step = ("model=tiny-llama", "recipe=standard", "train.steps=1", "train.warmup_steps=0",
                "train.checkpoint_every=0")
    cell = make_cell(*one_step)
    # the one step is the last: training finishes, evaluation must not start
    work = _stopped_attempt(tmp_path, cell, match="evaluation")
    trained = json.loads((work / PROGRESS_FILE).read_text())["step_times_s"]
    assert (work / "checkpoints" / "checkpoint-1").is_dir() and len(trained) == 1
    row = run_cell(cell, tmp_path, progress=False)
    assert row["status"] == "ok" and row["attempts"] == 2 and row["eval_loss"] is not None
    assert row["step_times_s"] == trained and row["train_steps"] == 1  # no step was trained again
    assert row["final_train_loss"] is not None
    # the adapters evaluated are the trained ones, not a fresh initialisation (LoRA B starts at zero)
    fresh = run_cell(make_cell(*one_step), tmp_path / "fresh", progress=False)
    assert row["eval_loss"] == pytest.approx(fresh["eval_loss"], rel=1e-5)
    assert abs(row["eval_loss"] - _base_eval_loss(tmp_path / "base", "tiny-llama")) > 1e-4


def test_step_times_missing_for_a_checkpoint_fail_the_cell_instead_of_undercounting(tmp_path):
    cell = make_cell("model=tiny-llama", "recipe=standard")
    (_stopped_attempt(tmp_path, cell) / PROGRESS_FILE).unlink()
    with pytest.raises(RuntimeError, match="train time cannot be accounted"):
        run_cell(cell, tmp_path, progress=False)


def test_cell_id_is_a_stable_hash_of_the_resolved_config():
    a, b = make_cell("model=tiny-llama"), make_cell("model=tiny-llama")
    assert a.cell_id == b.cell_id and len(a.cell_id) == 16
    assert make_cell("model=tiny-llama", "seed=7").cell_id != a.cell_id
    assert make_cell("model=tiny-llama", "train.lr=0.01").cell_id != a.cell_id
    # where it runs is not what it is
    assert make_cell("model=tiny-llama", "model.resources.time_min=999").cell_id == a.cell_id


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("model.family=bloom", "unknown architecture family 'bloom'"),
    ("recipe.attention_rank=0", "recipe.attention_rank=0: LoRA ranks must be positive"),
    ("recipe.mlp_rank=-1", "recipe.mlp_rank=-1: LoRA ranks must be positive"),
    ("recipe.layer_pct=0", "recipe.layer_pct=0.0: top-k percentage must be in (0, 100]"),
    ("recipe.layer_pct=150", "top-k percentage must be in (0, 100]"),
    ("data.source=/nonexistent/alpaca.jsonl", "data.source='/nonexistent/alpaca.jsonl': no such file"),
    ("train.stepz=3", "stepz"),
])
def test_bad_input_fails_before_running_with_a_clear_error(tmp_path, override, message):
    result = _cli("run-cell", "model=tiny-llama", f"results_dir={tmp_path}", override, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not list(tmp_path.rglob("row.json"))


def test_alpaca_file_from_disk_is_used(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w})
                              for w in ["alpha", "beta", "gamma", "delta"] * 30))
    row = run_cell(make_cell("model=tiny-llama", f"data.source={data}", "data.eval_size=8"), tmp_path,
                   progress=False)
    assert row["status"] == "ok" and row["config"]["data"]["source"] == str(data)


def test_run_cell_cli_writes_the_row_where_the_docs_say(tmp_path):
    result = _cli("run-cell", "model=tiny-llama", "recipe=aletheia", "seed=42", f"results_dir={tmp_path}",
                  *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    cell_id = json.loads(result.stdout.strip().splitlines()[-1])["cell_id"]
    assert read_row(tmp_path / "default" / "cells" / cell_id / "row.json")["recipe"] == "aletheia"


def test_the_worker_survives_a_flood_of_stop_signals():
    # SLURM signals every process of the step and the job function forwards the signal as well, so
    # handlers nest; one that takes a lock (threading.Event) deadlocks here within seconds.
    code = ("import time\nfrom aletheia_hpc.worker.stop import StopSignal, install_stop_handlers\n"
            "stop = StopSignal()\ninstall_stop_handlers(stop)\nprint('ready', flush=True)\n"
            "t = time.time()\nwhile time.time() - t < 4:\n    pass\nprint('requested', stop.requested, flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 2.5
        sent = 0
        while time.monotonic() < deadline:
            os.kill(child.pid, signal.SIGUSR2)
            os.kill(child.pid, signal.SIGUSR2)
            sent += 2
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0 and "requested True" in out, (child.returncode, out, sent)
    finally:
        child.kill()
