"""Rows -> tables: reading row files, the per-run table, the arm/Standard pairs, the paper's CSVs.

Arms. A run's arm is ``recipe`` or ``recipe@variant`` (aletheia_hpc.row.arm_name). The paper's two
arms are ``standard`` and ``aletheia``; a study adds any others (``random_k``,
``aletheia@budget25``, ``aletheia@compute_matched``, ...).

Pairing rule. Training runs are the rows of every recipe but ``base`` and ``paired_timing``; only ``ok`` rows pair. Every
run of an arm other than ``standard`` is paired with the ok Standard run of the same model and seed
in its *standard variant*: ``matched`` for the ``compute_matched`` variant and for Standard runs of
other variants, the run's own variant when that variant has Standard runs, else ``matched``.
Should a key (model, arm, seed) have several ok rows (different cell ids), the one that finished
last is used. The paper's tables (RESULTS_MASTER, RESULTS_CAMPAIGN2, the headline statistics) use
the pairs of recipe ``aletheia`` only.

Base rows (recipe ``base``) are matched to pairs by model alone (latest ok base row per model).
Benchmark accuracies are fractions in rows; the pair tables carry them as percent (``*_pct``) and
their differences in percentage points (``*_pp``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from aletheia_hpc.evaluation.benchmarks import REGISTRY, SCORE_FIELDS
from aletheia_hpc.row import (BASE_RECIPE, CSV_JSON_FIELDS, CSV_SCALAR_FIELDS, ROW_FILENAME, TIMING_RECIPE, InvalidRow,
                              arm_name, read_accounting, read_row)

from .paper import model_sort_key, paper_name

PAPER_RECIPES = ("standard", "aletheia")  # the two arms of the paper's tables
STANDARD, ALETHEIA = PAPER_RECIPES
DEFAULT_VARIANT = "matched"
COMPUTE_MATCHED = "compute_matched"
# benchmark short name -> row field (the evaluation registry names them)
BENCH_FIELDS = dict(SCORE_FIELDS)

_SLURM_KEYS = ("job_id", "array_job_id", "array_task_id", "node")


# from the cell's accounting.json (row.ACCOUNTING_FILENAME): runs column -> its key; NaN without one
ACCOUNTING_COLUMNS = {"gpu_hours": "gpu_hours", "job_elapsed_s": "elapsed_s"}


# runs column -> the key of the resolved config's recipe it comes from (how a run chose its layers)
CONFIG_RECIPE_COLUMNS = {"layer_rule": "layers", "layer_pct": "layer_pct"}


def _run_columns() -> tuple[str, ...]:
    """runs.csv's columns: the row's scalar fields in schema order (paper_model after model,
    layer_rule and layer_pct, the resolved config's recipe.layers and recipe.layer_pct, after recipe,
    n_selected_layers after num_layers), then its JSON fields, slurm_*, the scheduler's accounting,
    row_path."""
    columns = []
    for name in CSV_SCALAR_FIELDS:
        columns.append(name)
        columns += {"model": ["paper_model"], "recipe": list(CONFIG_RECIPE_COLUMNS),
                    "num_layers": ["n_selected_layers"]}.get(name, [])
    return (*columns, *CSV_JSON_FIELDS, *(f"slurm_{k}" for k in _SLURM_KEYS), *ACCOUNTING_COLUMNS, "row_path")


RUN_COLUMNS = _run_columns()
ROW_PATH_KEY = "_row_path"  # set by load_rows on the dicts it returns
ACCOUNTING_KEY = "_accounting"  # set by load_rows: the cell's accounting.json, {} when it has none


@dataclass
class BadRow:
    """A row file that could not be used, with the reason (from InvalidRow)."""

    path: str
    reason: str


@dataclass
class LoadedRows:
    rows: list[dict] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    cells_without_row: list[str] = field(default_factory=list)


def load_rows(results_dir: Path, campaign: str) -> LoadedRows:
    """Read every ``<results_dir>/<campaign>/cells/<cell_id>/row.json``.

    Corrupt, truncated or schema-violating files are collected in ``bad_rows`` (path + reason) and
    skipped; cell directories without a row file (cells running or lost) in ``cells_without_row``.
    Each row dict also carries its path and the accounting.json beside it (ROW_PATH_KEY, ACCOUNTING_KEY).
    """
    cells = Path(results_dir) / campaign / "cells"
    loaded = LoadedRows()
    if not cells.is_dir():
        return loaded
    with os.scandir(cells) as entries:
        dirs = sorted(e.path for e in entries if e.is_dir())
    for cell_dir in dirs:
        path = os.path.join(cell_dir, ROW_FILENAME)
        if not os.path.isfile(path):
            loaded.cells_without_row.append(cell_dir)
            continue
        try:
            row = read_row(Path(path))
        except InvalidRow as exc:
            loaded.bad_rows.append(BadRow(path=path, reason=str(exc).replace(f"{path}: ", "", 1)))
            continue
        row[ROW_PATH_KEY] = path
        row[ACCOUNTING_KEY] = read_accounting(Path(cell_dir))
        loaded.rows.append(row)
    return loaded


_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, allow_nan=False)
_NUMBER_CHARS = str.maketrans("", "", "0123456789-+.e,")
FLOAT_FORMAT = "%.12g"  # floats in CSV text: 12 significant digits (row.json keeps them exact)


def _json_list(value: list) -> str:
    """A list of numbers (selected_layers, layer_scores) as compact JSON, without the generic
    encoder: floats get 12 significant digits. Anything else goes to the generic encoder."""
    text = None
    if type(value[0]) is int:
        text = ",".join(map(str, value))
    else:
        try:
            text = ",".join([FLOAT_FORMAT % x for x in value])
        except TypeError:
            pass
    if text is not None and not text.translate(_NUMBER_CHARS):  # nothing but number characters
        return "[" + text + "]"
    return _json_general(value)


def _json_general(value) -> str:
    try:
        return _JSON.encode(value)
    except (ValueError, TypeError):  # NaN / inf or odd types: readable, if not strict JSON
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _json_column(values: list) -> list:
    """JSON text of each value (None stays None); equal flat dicts and int/str lists are encoded once."""
    cache: dict = {}
    out = []
    for v in values:
        if v is None or (type(v) is float and v != v):  # NaN: key missing in the row
            out.append(None)
        elif type(v) is list:
            if not v:
                out.append("[]")
            elif type(v[0]) is str or type(v[0]) is int:  # benchmarks, selected layers: often equal
                try:
                    key = tuple(v)
                    text = cache.get(key)
                    if text is None:
                        text = cache[key] = _json_list(v) if type(v[0]) is int else _json_general(v)
                except TypeError:  # unhashable elements
                    text = _json_general(v)
                out.append(text)
            else:
                out.append(_json_list(v))
        elif type(v) is dict:
            try:
                key = tuple(v.items())
                text = cache.get(key)
                if text is None:
                    text = cache[key] = _json_general(v)
            except TypeError:  # unhashable values (nested objects)
                text = _json_general(v)
            out.append(text)
        else:
            out.append(_json_general(v))
    return out


_ROW_KEYS = CSV_SCALAR_FIELDS + CSV_JSON_FIELDS + ("config", "slurm", ACCOUNTING_KEY, ROW_PATH_KEY)


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per cell, every status kept, lists/objects as JSON text, sorted for reading."""
    raw = pd.DataFrame.from_records(rows, columns=list(_ROW_KEYS), nrows=len(rows)) if rows else \
        pd.DataFrame({k: pd.Series([], dtype=object) for k in _ROW_KEYS})
    df = pd.DataFrame(index=raw.index)
    for name in RUN_COLUMNS:
        if name in _INT_FIELDS:
            source = raw["selected_layers"].map(_length) if name == "n_selected_layers" else raw[name]
            df[name] = _as_int(source)
        elif name in _FLOAT_FIELDS:
            df[name] = pd.to_numeric(raw[name], errors="coerce").astype(float)
        elif name in CSV_JSON_FIELDS:
            df[name] = pd.Series(_json_column(raw[name].tolist()), index=raw.index, dtype=object)
        elif name.startswith("slurm_"):
            key = name[len("slurm_"):]
            df[name] = pd.Series([v.get(key) if type(v) is dict else None for v in raw["slurm"].tolist()],
                                 index=raw.index, dtype=object)
        elif name in ACCOUNTING_COLUMNS:
            key = ACCOUNTING_COLUMNS[name]
            df[name] = pd.to_numeric(pd.Series([v.get(key) if type(v) is dict else None
                                                for v in raw[ACCOUNTING_KEY].tolist()], index=raw.index, dtype=object),
                                     errors="coerce").astype(float)
        elif name in CONFIG_RECIPE_COLUMNS:
            key = CONFIG_RECIPE_COLUMNS[name]
            recipes = [c.get("recipe") if type(c) is dict else None for c in raw["config"].tolist()]
            values = [r.get(key) if type(r) is dict else None for r in recipes]  # a hand-edited config: None
            df[name] = (pd.to_numeric(pd.Series(values, index=raw.index, dtype=object), errors="coerce").astype(float)
                        if name == "layer_pct" else pd.Series(values, index=raw.index, dtype=object))
        elif name == "paper_model":
            names = {m: paper_name(m) for m in raw["model"].unique()}
            df[name] = raw["model"].map(names).astype(object)
        elif name == "row_path":
            df[name] = raw[ROW_PATH_KEY].astype(object)
        else:
            df[name] = _objects(raw[name])
    df["variant"] = df["variant"].where(df["variant"].notna(), DEFAULT_VARIANT)
    df["arm"] = [a if type(a) is str and a else arm_name(str(r), str(v))
                 for a, r, v in zip(df["arm"].tolist(), df["recipe"].tolist(), df["variant"].tolist())]
    df["seed"] = _tidy_seeds(df["seed"])
    return _sorted(df, ["recipe", "variant", "seed", "cell_id"])


def _length(value) -> int | None:
    return len(value) if type(value) is list else None


def _objects(col: pd.Series) -> pd.Series:
    """A column as Python objects with None (not NaN) for missing values."""
    col = col.astype(object)
    return col.where(col.notna(), None)


def _sorted(df: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """Sort by model (paper order first), then by ``then`` (text; integer seeds numerically)."""
    if df.empty:
        return df.reset_index(drop=True)
    models = df["model"].tolist()
    ranks = {m: model_sort_key(str(m))[0] for m in set(models)}
    columns = [[ranks[m] for m in models], [str(m) for m in models]]
    for c in then:
        values = df[c].tolist()
        if c == "seed":
            columns.append([(0, v) if type(v) is int else (1, str(v)) for v in values])
        else:
            columns.append([v if type(v) is str else str(v) for v in values])
    keys = list(zip(*columns))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return df.take(order).reset_index(drop=True)


_INT_FIELDS = ("num_layers", "trainable_params", "train_steps", "planned_steps",
               *(b.n_field for b in REGISTRY.values()), "nan_step", "attempts", "n_selected_layers")
_FLOAT_FIELDS = ("train_time_s", "probe_time_s", "model_load_time_s", "step_time_median_s",
                 "final_train_loss", "eval_loss", *SCORE_FIELDS.values())


def _as_int(values: pd.Series) -> pd.Series:
    """Counts as nullable integers (so CSVs say 200, not 200.0); non-integral values stay float."""
    numeric = pd.to_numeric(values, errors="coerce").astype(float)
    finite = numeric.dropna()
    if (finite == finite.round()).all():
        return numeric.astype("Int64")
    return numeric


def _tidy_seeds(seeds: pd.Series) -> pd.Series:
    """Seeds as given; integral numbers become Python ints so that 42 and 42.0 agree."""
    if seeds.dtype.kind in "iu":
        return seeds.astype(object)

    def tidy(s):
        if isinstance(s, (float, np.floating)) and float(s).is_integer():
            return int(s)
        if isinstance(s, np.integer):
            return int(s)
        return s
    return pd.Series([tidy(s) for s in seeds.tolist()], index=seeds.index, dtype=object)


def latest_per_key(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Keep, per key, the row that finished last (ties: the later cell id)."""
    if df.empty:
        return df
    if not df.duplicated(keys).any():
        return df
    order = df.assign(_fin=df["finished_at"].fillna("").astype(str)).sort_values(["_fin", "cell_id"], kind="stable")
    return order.drop_duplicates(keys, keep="last").drop(columns="_fin")


def training_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained (every recipe but base and the paired timing cells), every status."""
    return runs[~runs["recipe"].isin((BASE_RECIPE, TIMING_RECIPE))]


def latest_ok_training_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The ok training runs, one per (model, arm, seed): the latest (module docstring), with seed_key
    (the seed as text, to join on)."""
    ok = training_runs(runs)
    ok = ok[ok["status"] == "ok"].assign(seed_key=lambda d: d["seed"].astype(str))
    return latest_per_key(ok, ["model", "arm", "seed_key"])


def superseded_runs(runs: pd.DataFrame) -> int:
    """How many ok training runs are unused because a later row has the same (model, arm, seed)."""
    ok = training_runs(runs)
    ok = ok[ok["status"] == "ok"]
    if ok.empty:
        return 0
    keys = pd.DataFrame({"m": ok["model"].astype(str), "a": ok["arm"].astype(str), "s": ok["seed"].astype(str)})
    return int(keys.duplicated().sum())


def standard_variant_of(recipe: str, variant: str, variants_with_standard: set) -> str:
    """The variant whose Standard runs pair with runs of ``recipe`` in ``variant`` (module docstring)."""
    if recipe == STANDARD or variant == COMPUTE_MATCHED:
        return DEFAULT_VARIANT
    return variant if variant in variants_with_standard else DEFAULT_VARIANT


PAIR_SIDE_FIELDS = ("cell_id", "train_time_s", "train_steps", "trainable_params", "eval_loss",
                    "final_train_loss", "device", "gpu_name", "gpu_hours") + tuple(BENCH_FIELDS.values())


def hardware_label(device: pd.Series, gpu_name: pd.Series) -> pd.Series:
    """What a run was timed on: the GPU's name, else the device type (cpu), else 'unknown'."""
    return gpu_name.where(gpu_name.notna(), device).fillna("unknown").astype(str)


def pairs_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, arm, seed): an ok run of an arm other than ``standard`` beside the ok
    Standard run it is compared with (module docstring)."""
    ok = runs[runs["status"] == "ok"]
    train = latest_ok_training_runs(runs)
    std = train[train["recipe"] == STANDARD]
    arms = train[train["arm"] != STANDARD]
    with_std = set(std["variant"])
    arms = arms.assign(standard_variant=pd.Series(
        [standard_variant_of(r, v, with_std) for r, v in zip(arms["recipe"], arms["variant"])],
        index=arms.index, dtype=object))
    left = arms[["model", "family", "paper_model", "arm", "recipe", "variant", "standard_variant", "seed",
                 "seed_key", "num_layers", "n_selected_layers", "selected_layers", "probe_time_s",
                 *PAIR_SIDE_FIELDS]].rename(columns={f: f"arm_{f}" for f in PAIR_SIDE_FIELDS})
    left = left.rename(columns={"probe_time_s": "arm_probe_time_s"})
    right = std[["model", "variant", "seed_key", *PAIR_SIDE_FIELDS]].rename(
        columns={"variant": "standard_variant", **{f: f"std_{f}" for f in PAIR_SIDE_FIELDS}})
    pairs = left.merge(right, on=["model", "standard_variant", "seed_key"], how="inner")

    base = latest_per_key(ok[ok["recipe"] == BASE_RECIPE], ["model"])
    base = base[["model", *BENCH_FIELDS.values()]].rename(
        columns={f: f"base_{f}" for f in BENCH_FIELDS.values()})
    pairs = pairs.merge(base, on="model", how="left")

    out = pd.DataFrame({
        "model": pairs["model"], "paper_model": pairs["paper_model"], "family": pairs["family"],
        "arm": pairs["arm"], "recipe": pairs["recipe"],
        "variant": pairs["variant"], "standard_variant": pairs["standard_variant"],
        "seed": pairs["seed"], "std_cell_id": pairs["std_cell_id"], "arm_cell_id": pairs["arm_cell_id"],
    })
    st = pairs["std_train_time_s"].astype(float).to_numpy()
    at = pairs["arm_train_time_s"].astype(float).to_numpy()
    probe = pairs["arm_probe_time_s"].astype(float).to_numpy()
    out["std_train_time_s"] = st
    out["arm_train_time_s"] = at
    # a ratio of times taken on two kinds of hardware compares the machines, not the recipes
    out["std_hardware"] = hardware_label(pairs["std_device"], pairs["std_gpu_name"]).to_numpy()
    out["arm_hardware"] = hardware_label(pairs["arm_device"], pairs["arm_gpu_name"]).to_numpy()
    out["same_hardware"] = out["std_hardware"] == out["arm_hardware"]
    out["time_saved_s"] = st - at
    with np.errstate(divide="ignore", invalid="ignore"):
        out["time_ratio"] = st / at
        out["speedup_pct"] = (1.0 - at / st) * 100.0
        out["arm_probe_time_s"] = probe
        out["speedup_incl_probe_pct"] = (1.0 - (at + np.nan_to_num(probe)) / st) * 100.0
    # the scheduler's GPU-hours of each cell's jobs (load, probe, training, evaluation); NaN unaccounted
    out["std_gpu_hours"] = pairs["std_gpu_hours"].astype(float).to_numpy()
    out["arm_gpu_hours"] = pairs["arm_gpu_hours"].astype(float).to_numpy()
    for f in ("train_steps", "trainable_params"):
        out[f"std_{f}"] = pairs[f"std_{f}"].to_numpy()
        out[f"arm_{f}"] = pairs[f"arm_{f}"].to_numpy()
    out["num_layers"] = pairs["num_layers"].to_numpy()
    out["n_selected_layers"] = pairs["n_selected_layers"].to_numpy()
    out["selected_layers"] = pairs["selected_layers"].to_numpy()
    for f in ("eval_loss", "final_train_loss"):
        out[f"std_{f}"] = pairs[f"std_{f}"].astype(float).to_numpy()
        out[f"arm_{f}"] = pairs[f"arm_{f}"].astype(float).to_numpy()
        if f == "eval_loss":
            out["eval_loss_diff"] = out["arm_eval_loss"] - out["std_eval_loss"]
    for short, fld in BENCH_FIELDS.items():
        base_v = pairs[f"base_{fld}"].astype(float).to_numpy() * 100.0
        std_v = pairs[f"std_{fld}"].astype(float).to_numpy() * 100.0
        arm_v = pairs[f"arm_{fld}"].astype(float).to_numpy() * 100.0
        out[f"base_{short}_pct"] = base_v
        out[f"std_{short}_pct"] = std_v
        out[f"arm_{short}_pct"] = arm_v
        out[f"{short}_diff_pp"] = arm_v - std_v
        out[f"std_{short}_delta_pp"] = std_v - base_v
        out[f"arm_{short}_delta_pp"] = arm_v - base_v
        out[f"{short}_extra_pp"] = (arm_v - base_v) - (std_v - base_v)
    return _sorted(out, ["arm", "seed"])


def paper_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pairs of the paper's comparison: Aletheia (every variant) against Standard."""
    return pairs[pairs["recipe"] == ALETHEIA].reset_index(drop=True)


# RESULTS_MASTER.csv column -> pairs column
MASTER_COLUMNS = {
    "model": "model", "paper_model": "paper_model", "family": "family", "variant": "variant",
    "seed": "seed", "std_time_s": "std_train_time_s", "ale_time_s": "arm_train_time_s",
    "time_ratio": "time_ratio", "speedup_pct": "speedup_pct", "std_eval_loss": "std_eval_loss",
    "ale_eval_loss": "arm_eval_loss", "eval_loss_diff": "eval_loss_diff", "num_layers": "num_layers",
    "n_selected_layers": "n_selected_layers", "selected_layers": "selected_layers",
    "base_mmlu_pct": "base_mmlu_pct", "std_mmlu_pct": "std_mmlu_pct", "ale_mmlu_pct": "arm_mmlu_pct",
    "std_mmlu_delta_pp": "std_mmlu_delta_pp", "ale_mmlu_delta_pp": "arm_mmlu_delta_pp",
    "mmlu_extra_pp": "mmlu_extra_pp", "std_cell_id": "std_cell_id", "ale_cell_id": "arm_cell_id",
}
# RESULTS_CAMPAIGN2.csv columns copied unchanged from runs (the rest are derived)
CAMPAIGN2_FROM_RUNS = ("model", "paper_model", "family", "recipe", "variant", "seed", "status",
                       "failure_reason", "nan_step", "train_steps", "train_time_s", "probe_time_s",
                       "eval_loss", "num_layers", "n_selected_layers")


def master_rows(pairs: pd.DataFrame, variant: str) -> np.ndarray:
    """Positions in ``pairs`` of the RESULTS_MASTER rows (Aletheia pairs of ``variant``)."""
    return np.flatnonzero(((pairs["variant"] == variant) & (pairs["recipe"] == ALETHEIA)).to_numpy(dtype=bool))


def campaign2_rows(runs: pd.DataFrame) -> np.ndarray:
    """Positions in ``runs`` of the RESULTS_CAMPAIGN2 rows (every run of the paper's two recipes)."""
    return np.flatnonzero(runs["recipe"].isin(PAPER_RECIPES).to_numpy(dtype=bool))


def results_master(pairs: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The paper's Campaign 1 file: one row per model x seed pair of ``variant``."""
    p = pairs.iloc[master_rows(pairs, variant)]
    return pd.DataFrame({out: p[src] for out, src in MASTER_COLUMNS.items()}).reset_index(drop=True)


def results_campaign2(runs: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The paper's Campaign 2 file: one row per training run (every status), benchmarks in percent.

    Aletheia rows that paired also carry their Standard partner, speedup and benchmark differences.
    """
    r = runs.iloc[campaign2_rows(runs)]
    base = latest_per_key(runs[(runs["recipe"] == "base") & (runs["status"] == "ok")], ["model"])
    base = base.set_index("model")
    out = pd.DataFrame({name: r[name] for name in CAMPAIGN2_FROM_RUNS})
    for short, fld in BENCH_FIELDS.items():
        value = r[fld].astype(float) * 100.0
        base_v = r["model"].map(base[fld]).astype(float) * 100.0 if len(base) else value * np.nan
        out[f"{short}_pct"] = value
        out[f"base_{short}_pct"] = base_v
        out[f"{short}_delta_pp"] = value - base_v
    link = pairs[["arm_cell_id", "std_cell_id", "speedup_pct",
                  *(f"{s}_diff_pp" for s in BENCH_FIELDS)]]
    link = link.rename(columns={"std_cell_id": "paired_std_cell_id",
                                **{f"{s}_diff_pp": f"{s}_vs_std_pp" for s in BENCH_FIELDS}})
    out["cell_id"] = r["cell_id"]
    out = out.merge(link, left_on="cell_id", right_on="arm_cell_id", how="left").drop(columns="arm_cell_id")
    return out.reset_index(drop=True)


# ------------------------------------------------------------------------------------------ CSV

_CSV_SPECIAL = (",", '"', "\n", "\r")


def _csv_text(text: str) -> str:
    if "," in text or '"' in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def _column_cells(col: pd.Series) -> list[str]:
    """The CSV cells of one column; missing values are empty, floats have 12 significant digits."""
    fmt = FLOAT_FORMAT
    if col.dtype == np.float64:
        values = col.to_numpy()
        missing = np.isnan(values)
        if missing.all():
            return [""] * len(values)
        cells = list(map(fmt.__mod__, values.tolist()))
        for i in np.flatnonzero(missing).tolist():
            cells[i] = ""
        return cells
    if isinstance(col.dtype, pd.Int64Dtype):
        return ["" if x is None else str(x) for x in col.to_numpy(dtype=object, na_value=None).tolist()]
    if col.dtype.kind in "iub":
        return [str(x) for x in col.to_numpy().tolist()]
    if pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty"):
        cells = col.astype(object).fillna("").tolist()  # every value a str (or missing)
        joined = "\x00".join(cells)
        if any(c in joined for c in _CSV_SPECIAL):
            cells = ['"' + c.replace('"', '""') + '"' if c else "" for c in cells]
        return cells
    cells = []
    append = cells.append
    for x in col.to_numpy(dtype=object).tolist():
        if type(x) is str:
            append(x)
        elif x is None or x is pd.NA:
            append("")
        elif type(x) is float:
            append(fmt % x if x == x else "")
        else:
            append(str(x))
    joined = "\x00".join(cells)
    if any(c in joined for c in _CSV_SPECIAL):
        cells = [_csv_text(c) for c in cells]
    return cells


def frame_cells(df: pd.DataFrame, reuse: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """CSV cells of every column of ``df``; columns in ``reuse`` take those cells as they are."""
    reuse = reuse or {}
    return {c: reuse[c] if c in reuse else _column_cells(df[c]) for c in df.columns}


def pick(cells: list[str], positions: np.ndarray) -> list[str]:
    """``cells`` at ``positions`` (to reuse formatted cells for a row subset of another table)."""
    return [cells[i] for i in positions.tolist()]


def csv_text(df: pd.DataFrame, cells: dict[str, list[str]] | None = None) -> str:
    """``df`` as CSV text (no index), several times faster than ``DataFrame.to_csv`` for wide float
    tables; minimal quoting, readable by ``pandas.read_csv`` and the csv module. ``cells`` may hold
    the already formatted cells (``frame_cells``)."""
    header = ",".join(_csv_text(str(c)) for c in df.columns)
    if df.empty:
        return header + "\n"
    cells = cells if cells is not None else frame_cells(df)
    columns = [cells[c] for c in df.columns]
    return header + "\n" + "\n".join(map(",".join, zip(*columns))) + "\n"
