"""The aggregation entry points: rows -> tables, ``stats.json``, figures and ``REPORT.md``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from aletheia_hpc.evaluation.benchmarks import REGISTRY, read_samples
from aletheia_hpc.files import atomic_write

from .paper import PaperReference, load_autoresearch_reference, load_paper_reference, model_sort_key, paper_name
from .quality_flags import campaign_quality
from .stats import CONVENTIONS, PairBlocks, clean_json, empty_timing_stats
from .arms import arm_stats, ranking_stability
from .cost import cost_stats
from .staged import load_stage_decisions, staged_stats
from .speed import paired_timings, speed_stats
from .tables import (BENCH_FIELDS, CAMPAIGN2_FROM_RUNS, COMPUTE_MATCHED, DEFAULT_VARIANT, MASTER_COLUMNS,
                     PAPER_RECIPES, BadRow, campaign2_rows, csv_text, frame_cells, latest_ok_training_runs,
                     load_rows, master_rows, pairs_frame, paper_pairs, pick, results_campaign2, results_master,
                     runs_frame, superseded_runs)

OUTPUT_FILES = {
    "runs_csv": "runs.csv",
    "pairs_csv": "pairs.csv",
    "results_master_csv": "RESULTS_MASTER.csv",
    "results_campaign2_csv": "RESULTS_CAMPAIGN2.csv",
    "stats_json": "stats.json",
    "report_md": "REPORT.md",
}
FIGURES_DIRNAME = "figures"
INDENT_STATS_MAX_PAIRS = 5000


@dataclass
class AggregateResult:
    """What one aggregation produced. ``paths`` is empty when nothing was written (no out_dir)."""

    campaign: str
    out_dir: Path | None
    runs: pd.DataFrame
    pairs: pd.DataFrame
    master: pd.DataFrame
    campaign2: pd.DataFrame
    stats: dict
    n_rows: int
    expected_cells: int | None
    partial: bool
    completeness: str
    bad_rows: list[BadRow] = field(default_factory=list)
    cells_without_row: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    skipped_figures: dict[str, str] = field(default_factory=dict)
    report: str | None = None

    @property
    def runs_csv(self) -> Path | None:
        return self.paths.get("runs_csv")

    @property
    def pairs_csv(self) -> Path | None:
        return self.paths.get("pairs_csv")

    @property
    def results_master_csv(self) -> Path | None:
        return self.paths.get("results_master_csv")

    @property
    def results_campaign2_csv(self) -> Path | None:
        return self.paths.get("results_campaign2_csv")

    @property
    def stats_json(self) -> Path | None:
        return self.paths.get("stats_json")

    @property
    def report_md(self) -> Path | None:
        return self.paths.get("report_md")

    @property
    def figures_dir(self) -> Path | None:
        return self.paths.get("figures_dir")


# ---------------------------------------------------------------------------------------- stats

def primary_variant(pairs: pd.DataFrame) -> str:
    """``matched`` when it has pairs; else the variant with most pairs (compute_matched last)."""
    counts = Counter(pairs["variant"])
    if counts.get(DEFAULT_VARIANT) or not counts:
        return DEFAULT_VARIANT
    ranked = sorted(counts, key=lambda v: (v == COMPUTE_MATCHED, -counts[v], str(v)))
    return ranked[0]


def _group_indices(pairs: pd.DataFrame, keys: list[str]) -> dict:
    if pairs.empty:
        return {}
    return pairs.groupby(keys, sort=False, dropna=False).indices


def _ordered(names: Iterable) -> list:
    return sorted(set(names), key=lambda m: model_sort_key(str(m)))


def compute_stats(runs: pd.DataFrame, pairs: pd.DataFrame, timings: dict[str, dict] | None = None) -> dict:
    """The statistics part of ``stats.json`` (layout in the package docstring): the paper's
    Aletheia-vs-Standard comparison, every arm against Standard, measured vs predicted speed per arm
    (``timings``: the paired timing rows' measurements, speed.paired_timings), the probe's ranking
    stability and the GPU-hours the scheduler accounted."""
    latest = latest_ok_training_runs(runs)
    return {**paper_stats(runs[runs["recipe"].isin(PAPER_RECIPES)], paper_pairs(pairs)),
            "arms": arm_stats(latest, pairs), "speed": speed_stats(runs, pairs, timings or {}),
            "stability": ranking_stability(latest), "cost": cost_stats(runs, pairs)}


def paper_stats(runs: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """overall, by_variant, per_model, per_family, compute_matched over the Aletheia pairs."""
    arrays = PairBlocks(pairs)
    variant = primary_variant(pairs)
    variants = sorted(set(pairs["variant"]), key=lambda v: (v != DEFAULT_VARIANT, v == COMPUTE_MATCHED, v))
    seeds = pairs["seed"].to_numpy(object)
    by_model_variant = _group_indices(pairs, ["model", "variant"])
    by_variant = _group_indices(pairs, ["variant"])
    by_family_variant = _group_indices(pairs.assign(family=pairs["family"].fillna("unknown")),
                                       ["family", "variant"])

    per_model: dict[str, dict] = {}
    train = runs
    all_models = _ordered(list(train["model"].dropna()) + list(pairs["model"]))
    families = dict(zip(train["model"], train["family"]))
    status_counts = train.groupby(["model", "variant"], dropna=False)["status"].value_counts()
    for model in all_models:
        entry: dict[str, dict] = {}
        model_variants = set(train.loc[train["model"] == model, "variant"]) | {
            v for (m, v) in by_model_variant if m == model}
        for v in sorted(model_variants, key=lambda v: (v != DEFAULT_VARIANT, v == COMPUTE_MATCHED, v)):
            idx = by_model_variant.get((model, v))
            head = {"model": model, "paper_model": paper_name(model), "family": families.get(model),
                    "variant": v}
            if idx is None:
                try:
                    counts = status_counts.loc[(model, v)].to_dict()
                except KeyError:
                    counts = {}
                summary = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
                block = empty_timing_stats(f"no pairs: no ok Standard + ok Aletheia run of one seed "
                                           f"(runs of this model/variant: {summary or 'none'})")
                block["quality"] = {}
                entry[v] = {**head, "standard_variant": None, "seeds": [], **block}
                continue
            block = arrays.block(idx)
            std_variant = pairs["standard_variant"].iat[int(idx[0])]
            entry[v] = {**head, "family": pairs["family"].iat[int(idx[0])], "standard_variant": std_variant,
                        "seeds": seeds[idx].tolist(), **block}
        per_model[model] = entry

    def overall_for(v: str) -> dict:
        idx = by_variant.get(v)
        if idx is None:
            block = empty_timing_stats("no pairs: no complete Standard/Aletheia pair in this variant")
            block["quality"] = {}
        else:
            block = arrays.block(idx)
        model_means = [per_model[m][v]["speedup_pct_mean"] for m in per_model  # None: no finite speedup
                       if v in per_model[m] and per_model[m][v]["speedup_pct_mean"] is not None]
        return {"variant": v, "n_models": len(model_means),
                "per_model_speedup_pct_range": [min(model_means), max(model_means)] if model_means else None,
                "model_win_rate": float(np.mean([x > 0 for x in model_means])) if model_means else None,
                **block}

    per_family: dict[str, dict] = {}
    for (family, v), idx in sorted(by_family_variant.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        models = _ordered(pairs["model"].to_numpy(object)[idx])
        per_family.setdefault(family, {})[v] = {"family": family, "variant": v, "models": models,
                                                **arrays.block(idx)}

    cm_idx = by_variant.get(COMPUTE_MATCHED)
    if cm_idx is None:
        compute_matched = {"n_pairs": 0, "standard_variant": DEFAULT_VARIANT, "overall": None,
                           "per_model": {}, "note": "no compute_matched pairs in this campaign"}
    else:
        compute_matched = {
            "n_pairs": int(cm_idx.size), "standard_variant": DEFAULT_VARIANT,
            "overall": arrays.block(cm_idx),
            "per_model": {m: per_model[m][COMPUTE_MATCHED] for m in per_model
                          if per_model[m].get(COMPUTE_MATCHED, {}).get("n_pairs")},
            "note": "compute_matched Aletheia runs vs the matched-variant Standard run of the same "
                    "model and seed; quality differences are compute-matched Aletheia - Standard",
        }

    return {
        "primary_variant": variant,
        "variants": variants,
        "overall": overall_for(variant),
        "by_variant": {v: overall_for(v) for v in variants},
        "per_model": per_model,
        "per_family": per_family,
        "compute_matched": compute_matched,
    }


def score_quality(runs: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """stats.json ``quality_flags``: degenerate scores, paired per-question tests and data sources,
    from each ok cell's ``samples/<benchmark>.jsonl`` beside its row (see quality_flags)."""
    cells, samples = [], {}
    ok = runs[runs["status"] == "ok"]
    # eval_source is JSON text in runs, and most cells share one: decode each distinct text once
    decoded = {text: json.loads(text) for text in ok["eval_source"].dropna().unique() if isinstance(text, str)}
    columns = (ok[c].tolist() for c in ("cell_id", "model", "arm", "seed", "eval_source", "row_path"))
    for cell_id, model, arm, seed, text, row_path in zip(*columns):
        source = decoded.get(text) if isinstance(text, str) else None
        cells.append({"cell_id": cell_id, "model": model, "arm": arm, "seed": seed,
                      "eval_source": source if isinstance(source, dict) else {}})
        if isinstance(row_path, str) and row_path:
            found = {name: s for name in REGISTRY if (s := read_samples(Path(row_path).parent, name))}
            if found:
                samples[cell_id] = found
    chance = {b.name: b.chance for b in REGISTRY.values()}
    return campaign_quality(cells, samples, chance, list(zip(pairs["std_cell_id"], pairs["arm_cell_id"])))


# ----------------------------------------------------------------------------------- aggregation

def _completeness(n_rows: int, expected: int | None, n_bad: int, n_missing: int) -> tuple[bool, str]:
    extras = []
    if n_bad:
        extras.append(f"{n_bad} row file(s) unreadable")
    if n_missing:
        extras.append(f"{n_missing} cell director(ies) without a row yet")
    if expected is None:
        text = f"{n_rows} cells have rows (expected cell count not given)"
        partial = bool(n_bad or n_missing)
    else:
        text = f"{n_rows} of {expected} cells have rows"
        partial = n_rows < expected or bool(n_bad or n_missing)
        if n_rows > expected:
            extras.append(f"{n_rows - expected} more than expected")
    if extras:
        text += " (" + "; ".join(extras) + ")"
    return partial, text


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text, fsync=False)


def aggregate_rows(rows: Sequence[dict], *, campaign: str | None = None, out_dir: Path | None = None,
                   expected_cells: int | None = None, bad_rows: Sequence[BadRow] = (),
                   cells_without_row: Sequence[str] = (), figures: bool = True, report: bool = True,
                   paper_reference: PaperReference | None = None,
                   stage_decisions: Sequence[dict] = ()) -> AggregateResult:
    """Aggregate already-read row dicts (the fast, testable core of ``aggregate_campaign``).

    With ``out_dir`` the outputs are written there (``figures=False`` / ``report=False`` skip the
    PNGs / REPORT.md); without it nothing touches the disk and the result carries only dataframes,
    stats and (if ``report``) the report text.
    """
    rows = list(rows)
    if campaign is None:
        names = Counter(r.get("campaign") for r in rows if r.get("campaign"))
        campaign = names.most_common(1)[0][0] if names else "campaign"
    runs = runs_frame(rows)
    pairs = pairs_frame(runs)
    body = compute_stats(runs, pairs, paired_timings(rows))
    master = results_master(pairs, body["primary_variant"])
    campaign2 = results_campaign2(runs, pairs)
    partial, completeness = _completeness(len(rows), expected_cells, len(bad_rows), len(cells_without_row))
    failed = runs[runs["status"] != "ok"]
    stats = {
        "campaign": campaign,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_rows": len(rows),
        "n_rows_by_status": {k: int(v) for k, v in runs["status"].value_counts().items()},
        "n_rows_by_recipe": {str(k): int(v) for k, v in runs["recipe"].value_counts().items()},
        "expected_cells": expected_cells,
        "partial": partial,
        "completeness": completeness,
        "n_pairs_total": len(pairs),
        **body,
        "failed_cells": [
            {"cell_id": r.cell_id, "model": r.model, "recipe": r.recipe, "variant": r.variant,
             "seed": r.seed, "status": r.status, "failure_reason": r.failure_reason,
             "nan_step": None if pd.isna(r.nan_step) else int(r.nan_step)}
            for r in failed.itertuples(index=False)],
        "unreadable_rows": [{"path": b.path, "reason": b.reason} for b in bad_rows],
        "cells_without_row": [str(c) for c in cells_without_row],
        "duplicate_runs_superseded": superseded_runs(runs),
        "quality_flags": score_quality(runs, pairs),
        "conventions": CONVENTIONS,
    }
    if stage_decisions:  # a staged study (campaign.stages): its own tables beside the pairs
        stats["staged"] = staged_stats(rows, list(stage_decisions), load_autoresearch_reference())
    stats = clean_json(stats)
    result = AggregateResult(
        campaign=campaign, out_dir=Path(out_dir) if out_dir is not None else None, runs=runs,
        pairs=pairs, master=master, campaign2=campaign2, stats=stats, n_rows=len(rows),
        expected_cells=expected_cells, partial=partial, completeness=completeness,
        bad_rows=list(bad_rows), cells_without_row=[str(c) for c in cells_without_row])
    ref = paper_reference if paper_reference is not None else load_paper_reference()

    if result.out_dir is not None:
        out = result.out_dir
        out.mkdir(parents=True, exist_ok=True)
        paths = {key: out / name for key, name in OUTPUT_FILES.items()}
        # format each table's cells once; RESULTS_* reuse the cells of runs / pairs they copy
        runs_cells = frame_cells(runs)
        pairs_cells = frame_cells(pairs)
        at = master_rows(pairs, stats["primary_variant"])
        master_cells = frame_cells(master, {out: pick(pairs_cells[src], at) for out, src in MASTER_COLUMNS.items()})
        at = campaign2_rows(runs)
        c2_cells = frame_cells(campaign2, {c: pick(runs_cells[c], at) for c in CAMPAIGN2_FROM_RUNS})
        _write_text(paths["runs_csv"], csv_text(runs, runs_cells))
        _write_text(paths["pairs_csv"], csv_text(pairs, pairs_cells))
        _write_text(paths["results_master_csv"], csv_text(master, master_cells))
        _write_text(paths["results_campaign2_csv"], csv_text(campaign2, c2_cells))
        # indented for reading; a very large campaign gets the (much faster) compact C encoder
        indent = 1 if len(pairs) <= INDENT_STATS_MAX_PAIRS else None
        _write_text(paths["stats_json"], json.dumps(stats, indent=indent, allow_nan=False) + "\n")
        result.paths = {k: v for k, v in paths.items() if k != "report_md"}
        if figures:
            from .figures import make_figures

            fig_dir = out / FIGURES_DIRNAME
            result.figures, result.skipped_figures = make_figures(
                stats, rows, stats["primary_variant"], ref, fig_dir, list(stats["per_model"]))
            result.paths["figures_dir"] = fig_dir
    if report:
        from .report import render_report

        made = (result.figures, result.skipped_figures) if result.out_dir is not None and figures else None
        result.report = render_report(stats, runs, pairs, rows, ref, made)
        if result.out_dir is not None:
            _write_text(paths["report_md"], result.report)
            result.paths["report_md"] = paths["report_md"]
    return result


def aggregate_campaign(results_dir: Path | str, campaign: str, expected_cells: int | None = None, *,
                       figures: bool = True, report: bool = True) -> AggregateResult:
    """Read ``<results_dir>/<campaign>/cells/*/row.json`` and write every output into
    ``<results_dir>/<campaign>/``: runs.csv, pairs.csv, RESULTS_MASTER.csv, RESULTS_CAMPAIGN2.csv,
    stats.json, figures/*.png and REPORT.md (with a staged study's section when stages/stage<k>.json
    exist). Unreadable row files are reported, never fatal."""
    results_dir = Path(results_dir)
    loaded = load_rows(results_dir, campaign)
    return aggregate_rows(loaded.rows, campaign=campaign, out_dir=results_dir / campaign,
                          expected_cells=expected_cells, bad_rows=loaded.bad_rows,
                          cells_without_row=loaded.cells_without_row, figures=figures, report=report,
                          stage_decisions=load_stage_decisions(results_dir / campaign))


# --------------------------------------------------------------------------------- summary table

def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def summary_table(result: AggregateResult) -> str:
    """A compact plain-text table per model and variant (what the CLI prints after a campaign)."""
    header = ("model", "variant", "n", "std time s", "ale time s", "speedup %", "incl. probe %",
              "eval loss std/ale", "MMLU d pp")
    lines = []
    for model, by_variant in result.stats["per_model"].items():
        for v, b in by_variant.items():
            q = b.get("quality") or {}
            loss = q.get("eval_loss")
            mmlu = q.get("mmlu")
            speed = _num(b["speedup_pct_mean"], ".1f")
            if b.get("speedup_pct_sd") is not None:
                speed += f" +/- {b['speedup_pct_sd']:.1f}"
            lines.append((
                str(model), str(v), str(b["n_pairs"]), _num(b["std_time_s_mean"], ".1f"),
                _num(b["arm_time_s_mean"], ".1f"), speed, _num(b["speedup_incl_probe_pct_mean"], ".1f"),
                f"{loss['std_mean']:.3f}/{loss['arm_mean']:.3f}" if loss else "-",
                _num(mmlu.get("extra_pp_mean", mmlu["diff_mean"]), "+.2f") if mmlu else "-",
            ))
    o = result.stats["overall"]
    lines.append(("ALL", str(o["variant"]), str(o["n_pairs"]), _num(o["std_time_s_mean"], ".1f"),
                  _num(o["arm_time_s_mean"], ".1f"), _num(o["speedup_pct_mean"], ".1f"),
                  _num(o["speedup_incl_probe_pct_mean"], ".1f"), "", ""))
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "  ".join("-" * w for w in widths)
    title = f"campaign {result.campaign}: {result.completeness}" + (" [PARTIAL]" if result.partial else "")
    foot = "speedup % = (1 - t_ale/t_std) x 100, mean +/- SD over seeds; MMLU d = Aletheia - Standard (pp)"
    return "\n".join([title, fmt_row(header), rule, *(fmt_row(r) for r in lines[:-1]), rule,
                      fmt_row(lines[-1]), foot, cost_line(result.stats["cost"])])


def cost_line(cost: dict) -> str:
    """stats.json ``cost`` in one line: GPU-hours per arm and what Aletheia saved."""
    if not cost["n_cells_accounted"]:
        return "GPU-hours: none (no scheduler accounting beside the rows: local runs, or no status since the jobs ran)"
    ale = (cost["saved"].get("aletheia") or {}).get("overall")
    return ("GPU-hours (scheduler accounting): "
            + ", ".join(f"{arm}={a['gpu_hours']:.3f} ({a['cells_accounted']} cells)"
                        for arm, a in sorted(cost["per_arm"].items()) if a["cells_accounted"])
            + (f"; Aletheia saved {ale['saved_gpu_hours']:.3f} over {ale['n_pairs']} pair(s), probe included"
               if ale and ale["n_pairs"] else ""))
