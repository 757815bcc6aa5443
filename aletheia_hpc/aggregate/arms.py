"""Studies: every arm against Standard LoRA, the selection controls against Aletheia, and how stable
the probe's ranking is across seeds.

``stats.json["arms"][arm]``
    arm, recipe, variant, standard_variant, is_control
    overall     the timing block and quality of ``overall`` (stats.CONVENTIONS) over the arm's pairs
                with Standard, plus ``p_value_holm`` (timing) and ``quality[metric].p_value_holm``
    per_model   {model: the same over that model's pairs}
    vs_aletheia for a selection control (any recipe but standard and aletheia): its runs paired
                with the Aletheia run of the same model, seed and variant (else the matched
                variant) at an equal number of adapted layers, or, for a rule that picks its own
                number up to the layer budget (``recipe.layers`` in OWN_K_RULES: cost_aware), at
                the same budget (``recipe.layer_pct``); {aletheia_arm, overall: {n_pairs,
                n_own_k (pairs of that second kind at unequal numbers), n_unequal_k (left out),
                quality}, per_model}, quality blocks named ``aletheia_*`` / ``arm_*`` with
                differences arm - aletheia. None for other arms.
Holm. Each family of tests is one comparison (timing vs Standard, a quality metric vs Standard, a
quality metric vs Aletheia) at one scope (the campaign, or one model), across its arms; Holm's
step-down adjustment (stats.holm) is applied within each family.

``stats.json["stability"][model]``
    arm (whose runs are read: aletheia, else the first probing arm), n_seeds, n_seeds_compared
    (at most MAX_STABILITY_SEEDS, the lowest), jaccard_mean,
    jaccard_min (of the selected layer sets), spearman_mean, spearman_min (of the probe scores),
    over every two seeds; each seed draws its own probe batches. ``pairs`` lists them when there
    are at most 10 seeds.
"""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats as sps

from aletheia_hpc.row import DEFAULT_VARIANT

from .stats import QUALITY_METRICS, PairBlocks, finite_or_none, holm, metric_stats
from .tables import ALETHEIA, BENCH_FIELDS, PAPER_RECIPES, STANDARD

MAX_LISTED_SEED_PAIRS = 45  # 10 seeds
# selection rules whose number of layers is their own choice, at most the recipe's layer budget:
# their question is whether they beat Aletheia at that budget, so they pair with it at unequal k
OWN_K_RULES = frozenset({"cost_aware"})
# every two of this many seeds (the lowest, in seed order) at most: a study has a handful; a
# synthetic or sweep campaign with thousands would otherwise cost a seeds x seeds matrix
MAX_STABILITY_SEEDS = 50


def arm_order(arms) -> list[str]:
    """standard first, then aletheia and its variants, then the others, alphabetically."""
    return sorted(set(arms), key=lambda a: (a != STANDARD, not a.startswith(ALETHEIA), a))


def _adjust(blocks: list[dict]) -> None:
    """Holm across ``blocks`` (one per arm, same scope): timing p and each quality metric's p."""
    for p, value in zip(blocks, holm([b.get("p_value") for b in blocks])):
        p["p_value_holm"] = value
    for metric, _, _ in QUALITY_METRICS:
        members = [b["quality"][metric] for b in blocks if metric in (b.get("quality") or {})]
        for q, value in zip(members, holm([q.get("p_value") for q in members])):
            q["p_value_holm"] = value


def control_pairs(ok: pd.DataFrame) -> pd.DataFrame:
    """Each ok run of a selection control beside the ok Aletheia run of the same model and seed
    (same variant, else matched): arm, model, seed, k of both, whether the arm picks its own k at
    Aletheia's budget (``own_k``), eval loss and benchmarks of both.
    ``ok``: tables.latest_ok_training_runs of the runs."""
    ale = ok[ok["recipe"] == ALETHEIA].set_index(["model", "variant", "seed_key"])
    controls = ok[~ok["recipe"].isin(PAPER_RECIPES)]
    records = []
    metrics = ["eval_loss", *BENCH_FIELDS.values()]
    for r in controls.itertuples(index=False):
        for variant in (r.variant, DEFAULT_VARIANT):
            key = (r.model, variant, r.seed_key)
            if key in ale.index:
                partner = ale.loc[key]
                break
        else:
            continue
        own_k = r.layer_rule in OWN_K_RULES and r.layer_pct == partner["layer_pct"]
        records.append({"arm": r.arm, "model": r.model, "seed": r.seed, "aletheia_arm": partner["arm"],
                        "arm_k": r.n_selected_layers, "aletheia_k": partner["n_selected_layers"], "own_k": own_k,
                        **{f"arm_{m}": getattr(r, m) for m in metrics},
                        **{f"aletheia_{m}": partner[m] for m in metrics}})
    columns = ["arm", "model", "seed", "aletheia_arm", "arm_k", "aletheia_k", "own_k",
               *(f"{side}_{m}" for side in ("arm", "aletheia") for m in metrics)]
    return pd.DataFrame.from_records(records, columns=columns)


def _numbers(col: pd.Series) -> np.ndarray:
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _vs_aletheia_block(group: pd.DataFrame) -> dict:
    same_k = _numbers(group["arm_k"]) == _numbers(group["aletheia_k"])
    own_k = group["own_k"].to_numpy(dtype=bool) & ~same_k
    equal = group[same_k | own_k]
    quality = {}
    for metric, scale, unit in QUALITY_METRICS:
        field = "eval_loss" if metric == "eval_loss" else BENCH_FIELDS[metric]
        q = metric_stats(_numbers(equal[f"aletheia_{field}"]), _numbers(equal[f"arm_{field}"]),
                         scale=scale, unit=unit, ref="aletheia")
        if q is not None:
            quality[metric] = q
    return {"n_pairs": int(len(equal)), "n_own_k": int(own_k.sum()), "n_unequal_k": int(len(group) - len(equal)),
            "quality": quality}


def arm_stats(ok: pd.DataFrame, pairs: pd.DataFrame) -> dict:
    """``stats.json["arms"]`` (module docstring); ``ok``: tables.latest_ok_training_runs of the runs."""
    if pairs.empty:
        return {}
    blocks = PairBlocks(pairs)
    by_arm = pairs.groupby("arm", sort=False).indices
    by_arm_model = pairs.groupby(["arm", "model"], sort=False).indices
    controls = control_pairs(ok)
    out: dict[str, dict] = {}
    for arm in arm_order(by_arm):
        idx = by_arm[arm]
        first = int(idx[0])
        recipe = pairs["recipe"].iat[first]
        per_model = {m: blocks.block(i) for (a, m), i in by_arm_model.items() if a == arm}
        entry = {"arm": arm, "recipe": recipe, "variant": pairs["variant"].iat[first],
                 "standard_variant": pairs["standard_variant"].iat[first],
                 "is_control": recipe not in PAPER_RECIPES,
                 "overall": blocks.block(idx), "per_model": per_model, "vs_aletheia": None}
        mine = controls[controls["arm"] == arm]
        if entry["is_control"] and not mine.empty:
            entry["vs_aletheia"] = {
                "aletheia_arm": str(mine["aletheia_arm"].mode().iat[0]),
                "overall": _vs_aletheia_block(mine),
                "per_model": {m: _vs_aletheia_block(g) for m, g in mine.groupby("model", sort=False)}}
        out[arm] = entry
    _adjust([e["overall"] for e in out.values()])
    _adjust([e["vs_aletheia"]["overall"] for e in out.values() if e["vs_aletheia"]])
    for model in pairs["model"].unique():
        _adjust([e["per_model"][model] for e in out.values() if model in e["per_model"]])
        _adjust([e["vs_aletheia"]["per_model"][model] for e in out.values()
                 if e["vs_aletheia"] and model in e["vs_aletheia"]["per_model"]])
    return out


def _as_list(value):
    if value is None or (isinstance(value, float) and value != value):
        return None
    return json.loads(value) if isinstance(value, str) else list(value)


def ranking_stability(ok: pd.DataFrame) -> dict:
    """``stats.json["stability"]`` (module docstring); ``ok``: tables.latest_ok_training_runs of the runs."""
    probed = ok[ok["layer_scores"].notna()]
    out: dict[str, dict] = {}
    for model, group in probed.groupby("model", sort=False):
        arms = list(group["arm"].unique())
        arm = ALETHEIA if ALETHEIA in arms else arm_order(arms)[0]
        runs_of_arm = group[group["arm"] == arm]
        n_seeds = len(runs_of_arm)
        runs_of_arm = runs_of_arm.iloc[:MAX_STABILITY_SEEDS]  # runs frames are sorted by seed
        seeds = runs_of_arm["seed"].tolist()
        scores = [_as_list(v) for v in runs_of_arm["layer_scores"]]
        chosen = [_as_list(v) for v in runs_of_arm["selected_layers"]]
        if len(seeds) < 2 or len({len(s) for s in scores}) != 1:
            out[model] = {"arm": arm, "n_seeds": len(seeds), "jaccard_mean": None, "jaccard_min": None,
                          "spearman_mean": None, "spearman_min": None,
                          "note": "fewer than 2 seeds with probe scores of one depth"}
            continue
        n_layers = len(scores[0])
        member = np.zeros((len(seeds), n_layers), dtype=float)
        for i, layers in enumerate(chosen):
            member[i, layers] = 1.0
        inter = member @ member.T
        sizes = member.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            jaccard = np.where(union > 0, inter / union, 1.0)
        ranks = sps.rankdata(np.asarray(scores, dtype=float), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.corrcoef(ranks)
        iu = np.triu_indices(len(seeds), k=1)
        j_values, r_values = jaccard[iu], rho[iu]
        entry = {"arm": arm, "n_seeds": n_seeds, "n_seeds_compared": len(seeds), "n_layers": n_layers,
                 "jaccard_mean": finite_or_none(j_values.mean()), "jaccard_min": finite_or_none(j_values.min()),
                 "spearman_mean": finite_or_none(np.nanmean(r_values)) if np.isfinite(r_values).any() else None,
                 "spearman_min": finite_or_none(np.nanmin(r_values)) if np.isfinite(r_values).any() else None}
        if len(j_values) <= MAX_LISTED_SEED_PAIRS:
            entry["pairs"] = [{"seeds": [seeds[a], seeds[b]], "jaccard": finite_or_none(jaccard[a, b]),
                               "spearman": finite_or_none(rho[a, b])} for a, b in combinations(range(len(seeds)), 2)]
        out[model] = entry
    return out
