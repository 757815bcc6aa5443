"""An operator's mistakes (issue 30): each is refused with a message naming the field or file and the
fix, or recovered from. Each test here fails on 4fd9e62, where the mistake got through."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aletheia_hpc.aggregate import aggregate_campaign
from aletheia_hpc.cli import main
from aletheia_hpc.provenance import REPO_ROOT
from aletheia_hpc.row import write_row
from tests.test_aggregate import make_row

CAMPAIGN = "camp"


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI in this process: (exit status, stdout, stderr); argparse's own exits count too."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ per-verb flags and help

@pytest.mark.parametrize("argv, flag", [(("status", "--force", "x"), "--force"), (("aggregate", "--json"), "--json"),
                                        (("plan", "--watch"), "--watch"), (("run-cell", "--follow"), "--follow")])
def test_a_flag_the_verb_does_not_take_is_an_error(capsys, argv, flag):
    code, _, err = run_main(capsys, *argv, "campaign=smoke")
    assert code == 2 and "unrecognized arguments" in err and flag in err, err
    assert f"aletheia-hpc {argv[0]}" in err  # the verb's own usage line


def test_each_verb_lists_its_own_flags(capsys):
    code, plan_help, _ = run_main(capsys, "plan", "--help")
    assert code == 0 and "--sbatch" in plan_help and "--json" in plan_help
    assert "--force" not in plan_help and "--watch" not in plan_help
    code, status_help, _ = run_main(capsys, "status", "--help")
    assert code == 0 and "--watch" in status_help and "--interval" in status_help and "--sbatch" not in status_help
    code, launch_help, _ = run_main(capsys, "launch", "--help")
    assert code == 0 and "--force" in launch_help and "--until-done" in launch_help and "--json" not in launch_help
    code, top, _ = run_main(capsys, "--help")
    assert code == 0 and "VERB --help" in top and "run-cell" in top


@pytest.mark.parametrize("interval", ["-1", "0", "nan", "soon"])
def test_a_watch_interval_under_a_second_is_refused(capsys, interval):
    code, _, err = run_main(capsys, "status", "campaign=smoke", "--watch", "--interval", interval)
    assert code == 2 and "--interval" in err and ("at least 1 s" in err or "not a number" in err), err


def test_a_word_that_is_no_override_is_refused_for_a_verb_without_cell_ids(capsys):
    code, _, err = run_main(capsys, "status", "campaign=smoke", "oops")
    assert code == 2 and "'oops' is not a Hydra override (key=value)" in err, err


# ------------------------------------------------------------------ the one row validator

def _write_cells(results_dir: Path, rows: list[dict]) -> list[Path]:
    paths = []
    for row in rows:
        path = results_dir / CAMPAIGN / "cells" / row["cell_id"] / "row.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_row(path, row)
        paths.append(path)
    return paths


def _pair(seed: int) -> list[dict]:
    return [make_row("m", "standard", seed, time_s=100.0), make_row("m", "aletheia", seed, time_s=60.0)]


def test_aggregate_leaves_out_a_row_copied_from_another_cell_and_says_the_campaign_is_partial(tmp_path):
    paths = _write_cells(tmp_path, _pair(1) + _pair(2))
    shutil.copy(paths[0], paths[2])  # seed 1's standard row over seed 2's standard cell
    result = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=4, figures=False)
    assert result.partial and result.n_rows == 3
    (bad,) = result.bad_rows
    assert bad.path == str(paths[2]) and "row.json is not this cell's" in bad.reason, bad
    assert result.stats["overall"]["n_pairs"] == 1
    assert str(paths[2]) in result.report_md.read_text()


@pytest.mark.parametrize("field, value", [("train_time_s", 0), ("train_time_s", -5), ("train_time_s", 1e308),
                                          ("probe_time_s", -1.0), ("step_time_median_s", "fast")])
def test_an_impossible_time_is_a_damaged_row_named_and_left_out(tmp_path, field, value):
    paths = _write_cells(tmp_path, _pair(1) + _pair(2))
    row = json.loads(paths[3].read_text())  # seed 2's aletheia row, edited by hand
    row[field] = value
    paths[3].write_text(json.dumps(row))
    result = aggregate_campaign(tmp_path, CAMPAIGN, expected_cells=4)  # with figures: no matplotlib crash
    assert result.partial and result.n_rows == 3
    (bad,) = result.bad_rows
    assert bad.path == str(paths[3]) and field in bad.reason and "seconds" in bad.reason, bad
    overall = result.stats["overall"]
    assert overall["n_pairs"] == 1 and overall["speedup_pct_mean"] == pytest.approx(40.0)
    assert result.report_md.exists()


def test_status_names_a_damaged_row_file(tmp_path):
    ov = ["campaign=smoke", "campaign.models=[tiny-llama]", "campaign.recipes=[standard]", "campaign.seeds=[42]", f"results_dir={tmp_path}"]
    plan = json.loads(cli("plan", "--json", *ov).stdout)
    (cell,) = plan["cells"]
    row = tmp_path / "smoke" / "cells" / cell["cell_id"] / "row.json"
    row.parent.mkdir(parents=True)
    row.write_text('{"cell_id": "trunc')
    st = json.loads(cli("status", "--json", *ov).stdout)
    (c,) = st["cells"]
    assert c["state"] == "missing" and f"damaged {row}: cannot read row" in c["reason"], c


# ------------------------------------------------------------------ messages instead of tracebacks

@pytest.mark.parametrize("verb", ["plan", "status", "launch", "aggregate"])
@pytest.mark.parametrize("under", [False, True])
def test_a_results_dir_that_is_a_file_is_refused_by_name(capsys, tmp_path, verb, under):
    blocker = tmp_path / "results"
    blocker.write_text("not a directory\n")
    results = blocker / "deeper" if under else blocker
    code, _, err = run_main(capsys, verb, "campaign=smoke", "campaign.noop=true", f"results_dir={results}")
    assert code == 2 and f"results_dir={results}: {blocker} is a file, not a directory" in err, err
    assert "Traceback" not in err


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot write in: root writes anywhere but on a read-only file system."""
    if os.geteuid() == 0:
        return Path("/sys/aletheia-results")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "results"


@pytest.mark.parametrize("verb", ["launch", "aggregate", "run-cell"])
def test_an_unwritable_results_dir_is_refused_before_any_work(capsys, tmp_path, verb):
    results = _unwritable(tmp_path)
    overrides = ["model=tiny-llama", "recipe=standard"] if verb == "run-cell" else ["campaign=smoke",
                                                                                    "campaign.noop=true"]
    code, _, err = run_main(capsys, verb, *overrides, f"results_dir={results}")
    assert code == 2 and f"results_dir={results}: cannot write in" in err, err


@pytest.mark.parametrize("override, reason", [
    ("campaign.seeds=[a,b]", "campaign.seeds[0]: Value 'a' of type 'str' could not be converted to Integer"),
    ("campaign.seeds=[42.7]", "campaign.seeds[0]: Value '42.7' of type 'float' could not be converted to Integer"),
    ("train.steps=abc", "train.steps: Value 'abc' of type 'str' could not be converted to Integer")])
def test_a_merge_error_says_which_field_takes_which_type(capsys, override, reason):
    code, _, err = run_main(capsys, "plan", "campaign=smoke", override)
    assert code == 2 and f"Error merging override {override}: {reason}" in err, err


# ------------------------------------------------------------------ mistakes no longer silently accepted

def _plan_error(*overrides: str) -> str:
    from aletheia_hpc.campaign.matrix import expand
    from aletheia_hpc.config import ConfigError

    with pytest.raises(ConfigError) as err:
        expand(list(overrides))
    return str(err.value)


@pytest.mark.parametrize("axis", ["seeds", "recipes"])
def test_a_campaign_with_no_seeds_or_recipes_is_refused(capsys, tmp_path, axis):
    code, _, err = run_main(capsys, "launch", "campaign=smoke", "campaign.noop=true", f"campaign.{axis}=[]",
                            f"results_dir={tmp_path}")
    assert code == 2 and f"lists no {axis} (campaign.{axis}=[])" in err, err
    assert not (tmp_path / "smoke").exists()  # nothing ran, nothing was written


def test_a_variant_that_changes_nothing_standard_uses_is_refused():
    message = _plan_error("campaign=smoke", "campaign.models=[tiny-llama]",
                          "campaign.variants=[{name: matched}, {name: k25, overrides: ['recipe.layer_pct=25']}]")
    assert "tiny-llama/standard@k25" in message and "resolves to the same settings as" in message, message
    assert "aletheia@k25" not in message  # the budget means something to the layer selection


@pytest.mark.parametrize("field, name", [("models", "tiny-lama"), ("recipes", "aletheai")])
def test_a_variant_naming_an_unknown_model_or_recipe_is_blamed_on_the_variant(field, name):
    message = _plan_error("campaign=smoke", f"campaign.variants=[{{name: matched}}, {{name: v2, {field}: [{name}]}}]")
    assert message.startswith(f"campaign.variants[v2].{field}: unknown {field[:-1]} '{name}'"), message
    assert f"campaign.{field}:" not in message


STAGED = ["campaign=default", "campaign.name=staged_m", "campaign.seeds=[42]",
          "campaign.variants=[{name: matched, recipes: [standard, aletheia]}, "
          "{name: l1, recipes: [aletheia], overrides: ['recipe.layer_pct=34']}]",
          "campaign.stages={advance: 1, full_steps: 3, factorial_seeds: [42], factors: ["
          "{name: modules, levels: ['recipe.modules=attention', 'recipe.modules=mlp']}, "
          "{name: lr, levels: ['train.lr=1e-3', 'train.lr=2e-3']}]}"]


@pytest.mark.parametrize("override, message", [
    ("campaign.stages.advance=-1", "campaign.stages.advance=-1: must be between 1 and the 2"),
    # refused for a plain cell (recipe.modules: use one of ...), so refused as a level before stage 1 runs
    ("campaign.stages.factors=[{name: modules, levels: ['recipe.modules=attn', 'recipe.modules=mlp']}, "
     "{name: lr, levels: ['train.lr=1e-3', 'train.lr=2e-3']}]",
     "campaign.stages.factors[modules].levels recipe.modules=attn x campaign.stages.factors[lr].levels train.lr=1e-3 "
     "on arm aletheia: recipe.modules='attn': use one of"),
    ("campaign.stages.factors=[{name: lr, levels: ['train.lr=1e-3', 'train.lr=2e-3']}, "
     "{name: lr2, levels: ['train.lr=3e-3', 'train.lr=4e-3']}]", "lr and lr2 both set train.lr"),
])
def test_a_staged_study_mistake_is_refused_at_plan_time(tmp_path, override, message):
    text = _plan_error(*STAGED, f"results_dir={tmp_path}", override)
    assert message in text, text


def test_a_stage_decision_edited_against_its_ranking_is_refused(tmp_path):
    from aletheia_hpc.campaign.matrix import expand, next_stage
    from aletheia_hpc.campaign.stages import decide
    from aletheia_hpc.campaign.store import write_stage_decision

    overrides = [*STAGED, f"results_dir={tmp_path}"]
    plan = expand(overrides)
    stage = plan.current_stage
    loss = {"standard": 1.0, "aletheia": 0.9, "aletheia@l1": 0.8}  # l1 is best: it advances
    rows = {m["cell_id"]: {"status": "ok", "eval_loss": loss[m["arm"]], "train_time_s": 10.0, "probe_time_s": 1.0,
                           "recipe": "aletheia"} for m in stage.cells}
    decision = decide(stage.to_dict(), rows, plan.root.campaign.stages)
    decision["next"]["cells"] = next_stage(plan, decision)[1]
    assert decision["advanced"] == ["aletheia@l1"]
    path = write_stage_decision(tmp_path, plan.name, decision)
    assert expand(overrides).stages[0].decision["advanced"] == ["aletheia@l1"]  # as decided: accepted

    decision["advanced"] = ["aletheia"]  # the operator's hand edit
    path.write_text(json.dumps(decision))
    text = _plan_error(*overrides)
    assert f"{path}: advanced ['aletheia'], but its ranking gives ['aletheia@l1']" in text, text
    assert "move it aside to decide stage 1 again" in text


# ------------------------------------------------------------------ one lock for every writer of a cell

SLOW = ["campaign=default", "train.steps=3", "progress=false", "+campaign.faults={tiny-llama/standard/42:"
        "{sleep_per_step_s:3}}"]


def _cell_dirs(results: Path, overrides: list[str]) -> dict[str, Path]:
    plan = json.loads(cli("plan", "--json", *overrides).stdout)
    return {c["recipe"]: results / c["campaign"] / "cells" / c["cell_id"] for c in plan["cells"]}


def _wait_for(test, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline and proc.poll() is None, f"never: {what}"
        time.sleep(0.2)


def test_run_cell_refuses_a_cell_a_launch_is_training_and_never_replaces_a_row_without_a_copy(tmp_path):
    from aletheia_hpc.files import CELL_LOCK_FILE, lock_holder

    ov = [*SLOW, f"results_dir={tmp_path}"]
    cell = _cell_dirs(tmp_path, ov)["standard"]
    launch = subprocess.Popen([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (cell / "progress.json").exists(), "the launch's worker trains the cell", launch)
        holder = json.loads(lock_holder(cell / CELL_LOCK_FILE))
        same = ["campaign=default", "model=tiny-llama", "recipe=standard", "seed=42", "train.steps=3",
                "progress=false", f"results_dir={tmp_path}"]
        second = cli("run-cell", *same)
    finally:
        out, err = launch.communicate(timeout=600)
    assert second.returncode == 2, second.stderr[-2000:]
    assert (f"error: cell {cell.name} is being run by a local launch's worker (pid {holder['pid']} on host "
            f"{holder['host']}, started {holder['started_at']}); wait for it") in second.stderr, second.stderr
    assert launch.returncode == 0, err[-2000:]
    assert len(json.loads((cell / "attempts.json").read_text())) == 1  # trained once, by the launch
    assert not list(cell.glob("row.json.replaced-*"))
    first_row = json.loads((cell / "row.json").read_text())

    again = cli("run-cell", *same)  # on purpose, once the launch is through: it runs, keeping the old row
    assert again.returncode == 0, again.stderr[-2000:]
    (kept,) = cell.glob("row.json.replaced-*")
    assert json.loads(kept.read_text()) == first_row


def test_a_dispatched_worker_waits_for_the_writer_holding_the_cell_and_keeps_its_row(tmp_path):
    """A launch's worker that finds another writer on the cell (run-cell) waits, naming it; when that
    writer left an ok row, the worker runs nothing."""
    from aletheia_hpc.files import cell_lock

    ov = ["campaign=default", "campaign.recipes=[standard]", "campaign.noop=true", "progress=false",
          f"results_dir={tmp_path}"]
    first = cli("launch", *ov)
    assert first.returncode == 0, first.stderr[-2000:]
    cell = _cell_dirs(tmp_path, ov)["standard"]
    aside = tmp_path / "row.json.by-the-other-writer"
    (cell / "row.json").rename(aside)  # the cell is missing again: the next launch runs it
    other = {"by": "run-cell", "pid": os.getpid(), "host": "here", "started_at": "now"}
    with cell_lock(cell, other):
        launch = subprocess.Popen([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: any(b"is being run by run-cell (pid" in p.read_bytes() and b"waiting" in p.read_bytes()
                                  for p in (cell / "logs").glob("local-*.log")),
                      "the worker waits, naming the holder", launch)
        except AssertionError:
            launch.kill()
            raise
        aside.rename(cell / "row.json")  # the other writer finishes the cell
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 0, err[-2000:]
    assert len(json.loads((cell / "attempts.json").read_text())) == 1  # the worker ran nothing
    assert not list(cell.glob("row.json.replaced-*"))


# ------------------------------------------------------------------ a launcher that dies

def test_a_killed_local_launch_is_an_interruption_of_its_cell_not_a_failure(tmp_path):
    """SIGKILL of a local launch (no handler runs): its orphaned worker notices, checkpoints and stops,
    writing no failed row; its attempt is recorded as interrupted, and the next launch resumes it."""
    ov = ["campaign=default", "campaign.recipes=[standard]", f"results_dir={tmp_path}", "train.steps=4",
          "train.checkpoint_every=2", "progress=false", "+campaign.faults={tiny-llama/standard/42:{sleep_per_step_s:1.5}}"]
    cell = _cell_dirs(tmp_path, ov)["standard"]
    launch = subprocess.Popen([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (cell / "progress.json").exists(), "the cell makes progress", launch)
        worker = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                      and str(cell) in (p / "cmdline").read_bytes().decode(errors="replace")
                      if (p / "cmdline").exists())
        launch.kill()
        launch.communicate(timeout=60)
        deadline = time.monotonic() + 300
        while Path(f"/proc/{worker}").exists() and b"zombie" not in _proc_state(worker):
            assert time.monotonic() < deadline, "the orphaned worker never stopped"
            time.sleep(0.5)
    finally:
        launch.kill()
    assert not (cell / "row.json").exists(), (cell / "row.json").read_text()
    (attempt,) = json.loads((cell / "attempts.json").read_text())
    assert attempt["interrupted"].startswith("interrupted: its launcher"), attempt
    steps = json.loads((cell / "progress.json").read_text())["step"]
    assert 0 < steps < 4 and (cell / "checkpoints" / f"checkpoint-{steps}").is_dir(), steps
    (log,) = (cell / "logs").glob("local-*.log")
    assert b"an interruption, not a failure of the cell" in log.read_bytes()
    st = json.loads(cli("status", "--json", *ov).stdout)
    assert st["counts"] == {"missing": 1}, st

    again = cli("launch", *ov)
    assert again.returncode == 0, again.stderr[-2000:]
    row = json.loads((cell / "row.json").read_text())
    assert row["status"] == "ok" and row["attempts"] == 2, row


def _proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b"zombie"
