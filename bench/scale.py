"""Benchmark of the campaign engine at scale (issue 26): plan and status of the referee campaign grown
to about 1,000, 10,000 and 100,000 cells by its seeds (10 models x 6 recipes x seeds + 10 base cells),
and aggregate of as many synthetic rows (bench/aggregate.py's core timing). Each step runs as the CLI
runs it, in its own process; wall time and that process's peak memory (max RSS) are printed.

  plan (cold)  -- an empty results directory: every (model, recipe) composed by Hydra
  plan (warm)  -- again: compositions read from <campaign>/plan_cache
  status       -- every cell's files, nothing run yet (local cluster: no scheduler to ask)

Floors: plan and status of 10,000 cells <= 10 s each and plan <= 2x the paper's 128-cell plan;
aggregate of 100,000 rows < 10 s.

    .venv/bin/python bench/scale.py                     # 1,000 / 10,000 / 100,000 cells
    .venv/bin/python bench/scale.py --cells 1000 10000 --out bench/results/scale_cpu.txt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PER_SEED, BASE_CELLS = 60, 10  # referee: 10 models x 6 recipes per seed, one base cell per model


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, last stdout line) of one process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(command[:6])} ...: exit {proc.returncode}\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, (out.read().strip().splitlines() or [""])[-1]


def cli(verb: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "aletheia_hpc.cli", verb, *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--out", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    lines = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"bench/scale.py on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {time.strftime('%F %T')}")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        # a local cluster that runs GPU cells on the CPU: placement passes here, nothing runs
        paper = ["campaign=paper", "cluster.cpu_fallback=true", f"results_dir={tmp}/paper"]
        figures["paper plan cold"] = timed(cli("plan", paper))
        figures["paper plan warm"] = timed(cli("plan", paper))
        for name in ("paper plan cold", "paper plan warm"):
            say(f"{name:28s} 128 cells  {figures[name][0]:7.2f} s  {figures[name][1]:7.0f} MiB")
        for n in args.cells:
            seeds = max(1, round((n - BASE_CELLS) / PER_SEED))
            cells = seeds * PER_SEED + BASE_CELLS
            overrides = ["campaign=referee", "cluster.cpu_fallback=true", f"results_dir={tmp}/r{n}",
                         f"campaign.seeds=[{','.join(map(str, range(seeds)))}]"]
            for step, command in (("plan cold", cli("plan", overrides)), ("plan warm", cli("plan", overrides)),
                                  ("status", cli("status", overrides)),
                                  ("aggregate", [sys.executable, str(ROOT / "bench" / "aggregate.py"),
                                                 "--rows", str(cells), "--files", "0"])):
                wall, mib, _ = figures[(n, step)] = timed(command)
                say(f"{step:28s} {cells:6d} cells  {wall:7.2f} s  {mib:7.0f} MiB")
    say("floors:")
    for n in args.cells:
        if n == 10_000:
            for step in ("plan cold", "plan warm", "status"):
                s = figures[(n, step)][0]
                say(f"  {step} of 10,000 cells <= 10 s: {'met' if s <= 10 else 'MISSED'} ({s:.2f} s)")
            for step, base in (("plan cold", "paper plan cold"), ("plan warm", "paper plan warm")):
                ratio = figures[(n, step)][0] / figures[base][0]
                say(f"  {step} of 10,000 cells <= 2x the paper's: {'met' if ratio <= 2 else 'MISSED'} ({ratio:.2f}x)")
        if n == 100_000:
            s = figures[(n, "aggregate")][0]
            say(f"  aggregate of 100,000 rows < 10 s (process wall, imports included): "
                f"{'met' if s < 10 else 'MISSED'} ({s:.2f} s)")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
