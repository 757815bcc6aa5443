"""Campaign aggregation: row files -> tables, statistics, figures and a Markdown report.

Public API
    aggregate_campaign(results_dir, campaign, expected_cells=None, *, figures=True, report=True)
        reads ``<results_dir>/<campaign>/cells/*/row.json`` and writes into ``<results_dir>/<campaign>/``
    aggregate_rows(rows, *, campaign=None, out_dir=None, expected_cells=None, bad_rows=(),
                   cells_without_row=(), figures=True, report=True, paper_reference=None)
        the same from row dicts already in memory (writes only when ``out_dir`` is given)
    summary_table(result) -> str      compact plain-text per-model table for the CLI
    load_rows(results_dir, campaign) -> LoadedRows(rows, bad_rows, cells_without_row)
    paper_name(model), config_name(paper_model), load_paper_reference()

Outputs (in the campaign directory)
    runs.csv                one row per cell, every status; lists/objects as JSON text
                            (step_times_s and config stay in row.json only); gpu_hours and
                            job_elapsed_s from the accounting.json beside the row (SLURM)
    pairs.csv               one row per (model, seed, variant) Standard/Aletheia pair
    RESULTS_MASTER.csv      pairs of the primary variant (the paper's Campaign 1 file)
    RESULTS_CAMPAIGN2.csv   one row per training run, failed runs included (the paper's Campaign 2 file)
    stats.json              see below
    figures/*.png           speedup per model / by family, benchmark deltas, speed-quality, layer scores
    REPORT.md               tables, figures, failures, provenance, paper vs this run
  CSV floats carry 12 significant digits; missing values are empty cells. stats.json is indented
  unless a campaign has more than 5,000 pairs (then compact, for speed).

stats.json layout (definitions in ``stats.CONVENTIONS``, also written under ``conventions``)
    campaign, generated_at, n_rows, n_rows_by_status, n_rows_by_recipe, expected_cells, partial,
    completeness ("N of M cells have rows"), n_pairs_total, primary_variant, variants,
    overall            timing block (+ quality) over the primary variant's pairs, plus variant,
                       n_models, per_model_speedup_pct_range, model_win_rate
    by_variant         {variant: same as overall}
    per_model          {model: {variant: timing block + model, paper_model, family, variant,
                       standard_variant, seeds, quality}}  -- always nested by variant
    per_family         {family: {variant: timing block + models, quality}}
    compute_matched    {n_pairs, standard_variant, overall, per_model, note}
    speed              {arm: {model: measured speedup vs Standard, its 95% CI and the method that
                       measured it (paired | sequential), predicted_speedup, the difference}} (speed.py)
    cost               GPU-hours per arm (and per model) and what each arm saved against Standard over
                       its pairs, from the cells' accounting.json (cost.py)
    failed_cells, unreadable_rows, cells_without_row, duplicate_runs_superseded, conventions
    quality_flags      {flags: [{benchmark, model, recipe, n_cells, n_questions, accuracy_mean,
                       n_cells_flagged, flagged, warnings}], paired: {model: {benchmark: {pooled,
                       per_seed: {seed: ...}}}} (McNemar only_a/only_b/p_value and diff {diff, ci}),
                       sources: {benchmark: {source: n_cells}}, conventions}
                       (quality_flags.py; from the cells' samples/<benchmark>.jsonl)
  timing block: n_pairs, n_pairs_mixed_hardware (left out: see conventions), std_time_s_mean/sd,
    arm_time_s_mean/sd, time_saved_s_mean/sd,
    ratio_mean/sd, speedup_pct_mean/sd, speedup_pct_ci95 [lo, hi], speedup_pct_min/max,
    speedup_pct_from_mean_ratio, t_stat, df, p_value, cohens_dz (d_z of paired differences),
    win_rate, note
  quality: {eval_loss | mmlu | gsm8k | humaneval | task: {unit, n, std_mean/sd, arm_mean/sd, diff_mean/sd,
    diff_ci95, t_stat, df, p_value, note, and with a base row: n_with_base, base_mean,
    std_delta_pp_mean/sd, arm_delta_pp_mean/sd, extra_pp_mean/sd, extra_pp_ci95}}
  n < 2: t_stat/p_value/cohens_dz/CIs null, note "n too small: ..."; n = 0: note "no pairs: ...".
  zero variance (all differences identical): t_stat/p_value/cohens_dz null, note "zero variance: ...",
    CI of a constant = [mean, mean]. The file never contains NaN or infinity.
"""

from .core import AggregateResult, aggregate_campaign, aggregate_rows, compute_stats, summary_table
from .paper import PaperReference, config_name, load_paper_reference, paper_name
from .tables import BadRow, LoadedRows, load_rows

__all__ = [
    "AggregateResult", "BadRow", "LoadedRows", "PaperReference", "aggregate_campaign",
    "aggregate_rows", "compute_stats", "config_name", "load_paper_reference", "load_rows",
    "paper_name", "summary_table",
]
