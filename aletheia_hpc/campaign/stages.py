"""A staged study: which cells come next, decided from the rows of the stage before.

Stage 1 is the campaign's own cells (the scan arms). Its decision advances the ``advance`` best arms by
the objective, plus the baseline arm, to stage 2 at ``full_steps``; stage 2's decision takes the best
non-baseline arm (the winner) into stage 3, a full factorial over ``factors`` on the winner's settings
with ``factorial_seeds`` seeds; stage 3's decision names the best combination and ends the study.

Everything here is a pure function of rows and config: the same rows give the same decision, and the
decision (what advanced, on what figures, the next stage's arms) is what the campaign directory keeps
(``stages/stage<k>.json``), so planning again composes the same cells. An arm here is a stage's arm:
its name, recipe, variant name and the overrides its cells are composed with.
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Iterable

from aletheia_hpc.config import StagesConfig
from aletheia_hpc.row import arm_name, run_time_s

LAST_STAGE = 3


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: Iterable[str], extra: Iterable[str]) -> list[str]:
    """``base`` with every key that ``extra`` sets replaced by ``extra``'s value (one value per key)."""
    extra = list(extra)
    keys = {override_key(o) for o in extra}
    return [o for o in base if override_key(o) not in keys] + extra


def arm_figures(members: list[dict], rows: dict[str, dict | None]) -> dict[str, dict]:
    """Per stage arm, over its ok rows: n, mean eval loss and mean time (s). ``members``: the stage's
    cells ({cell_id, arm, seed}); ``rows``: cell_id -> row (None: no row yet). Base cells are no arm."""
    per_arm: dict[str, list[dict]] = {}
    for m in members:
        row = rows.get(m["cell_id"])
        if m["arm"] == "base":
            continue
        per_arm.setdefault(m["arm"], [])
        if row and row.get("status") == "ok" and row.get("eval_loss") is not None:
            per_arm[m["arm"]].append(row)
    out = {}
    for arm, ok in per_arm.items():
        times = [t for r in ok if (t := run_time_s(r)) is not None]
        out[arm] = {"arm": arm, "n": len(ok),
                    "eval_loss": statistics.fmean(r["eval_loss"] for r in ok) if ok else None,
                    "time_s": statistics.fmean(times) if times else None}
    return out


def rank_arms(figures: dict[str, dict], stages: StagesConfig) -> list[dict]:
    """The arms with figures, best first, each with its ``rank`` (1 = best) and ``score``.

    eval_loss: lower mean eval loss first; losses equal to ``loss_decimals`` decimals tie and the faster
    arm ranks first. speed_quality: score = eval loss x (time / the fastest arm's time) ** time_weight,
    lower first (time_weight 0 is eval loss alone). Remaining ties: by arm name, so the order is total."""
    usable = [dict(f) for f in figures.values() if f["eval_loss"] is not None and f["time_s"] is not None]
    if stages.objective == "speed_quality":
        fastest = min((f["time_s"] for f in usable), default=1.0) or 1.0
        for f in usable:
            f["score"] = f["eval_loss"] * (f["time_s"] / fastest) ** stages.time_weight
        key = lambda f: (f["score"], f["time_s"], f["arm"])
    else:
        for f in usable:
            f["score"] = round(f["eval_loss"], stages.loss_decimals)
        key = lambda f: (f["score"], f["time_s"], f["arm"])
    ranked = sorted(usable, key=key)
    for i, f in enumerate(ranked, 1):
        f["rank"] = i
    return ranked


def best_arms(ranking: list[dict], n: int, exclude: Iterable[str] = ()) -> list[str]:
    """The names of the ``n`` best-ranked arms that are not in ``exclude``."""
    skip = set(exclude)
    return [f["arm"] for f in ranking if f["arm"] not in skip][:n]


def objective_text(stages: StagesConfig) -> str:
    if stages.objective == "speed_quality":
        return (f"speed_quality: lowest eval loss x (time / fastest time)^{stages.time_weight:g}, "
                "time = training + probe")
    return (f"eval_loss: lowest mean held-out loss (equal to {stages.loss_decimals} decimals: the faster, "
            "time = training + probe)")


def rule_lines(stages: StagesConfig) -> list[str]:
    """How the later stages follow from the earlier ones, for ``plan``."""
    factors = " x ".join(f"{f.name} {{{', '.join(f.levels)}}}" for f in stages.factors)
    n_combos = math.prod(len(f.levels) for f in stages.factors)
    return [f"stage 2: the {stages.advance} best stage-1 arm(s) by {objective_text(stages)}, and the baseline "
            f"arm {stages.baseline}, rerun at {stages.full_steps} steps",
            f"stage 3: factorial on the best non-baseline stage-2 arm: {factors}, seeds {stages.factorial_seeds} "
            f"({n_combos * len(stages.factorial_seeds)} runs; a combination equal to an earlier cell reuses it)",
            "each stage is decided from the last one's rows once it is complete, and written to "
            "<results>/<campaign>/stages/stage<k>.json"]


def _full_arm(arm: dict, stages: StagesConfig) -> dict:
    variant = "full" if arm["variant"] == "matched" else f"{arm['variant']}-full"
    return {"name": arm_name(arm["recipe"], variant), "recipe": arm["recipe"], "variant": variant,
            "overrides": list(arm["overrides"]), "steps": stages.full_steps, "from_arm": arm["name"],
            "levels": {}}


def _factorial_arms(winner: dict, stages: StagesConfig) -> list[dict]:
    arms = []
    for levels in itertools.product(*(f.levels for f in stages.factors)):
        chosen = {f.name: level.split("=", 1)[1] for f, level in zip(stages.factors, levels)}
        variant = "fx-" + "-".join(f"{k}={v}" for k, v in chosen.items())
        arms.append({"name": arm_name(winner["recipe"], variant), "recipe": winner["recipe"], "variant": variant,
                     "overrides": merge_overrides(winner["overrides"], levels), "steps": stages.full_steps,
                     "from_arm": winner["name"], "levels": chosen})
    return arms


def decide(stage: dict, rows: dict[str, dict | None], stages: StagesConfig) -> dict:
    """The decision on a complete ``stage`` ({stage, arms, cells}): the ranking with its figures, what
    advanced, and the next stage's arms and seeds (``next``: None after the last stage). Cells without
    an ok row (allowed with --advance-with-failures) count in ``n_failed`` and in no figure."""
    k = stage["stage"]
    figures = arm_figures(stage["cells"], rows)
    ranking = rank_arms(figures, stages)
    by_name = {a["name"]: a for a in stage["arms"]}
    n_failed = sum(1 for c in stage["cells"] if c["arm"] != "base"
                   and not ((r := rows.get(c["cell_id"])) and r.get("status") == "ok"))
    decision = {"stage": k, "objective": objective_text(stages), "ranking": ranking, "n_failed": n_failed,
                "unranked": sorted(a for a in figures if a not in {f["arm"] for f in ranking})}
    if not ranking:
        raise ValueError(f"stage {k}: no arm has an ok row with an eval loss and a time; nothing can advance")
    if k == 1:
        top = best_arms(ranking, stages.advance, exclude=[stages.baseline])
        advanced = top + ([stages.baseline] if stages.baseline in by_name else [])
        decision.update(advanced=top, baseline=stages.baseline if stages.baseline in by_name else None,
                        next={"stage": 2, "seeds": stage["seeds"],
                              "arms": [_full_arm(by_name[a], stages) for a in advanced]})
    elif k == 2:
        candidates = best_arms(ranking, 1, exclude=[a["name"] for a in stage["arms"]
                                                    if a["from_arm"] == stages.baseline])
        if not candidates:
            raise ValueError("stage 2: only the baseline arm has results; no winner to take into the factorial")
        winner = by_name[candidates[0]]
        decision.update(advanced=[winner["name"]], winner=winner["name"],
                        next={"stage": 3, "seeds": list(stages.factorial_seeds),
                              "factors": [f.name for f in stages.factors], "arms": _factorial_arms(winner, stages)})
    else:
        decision.update(advanced=[], winner=ranking[0]["arm"], next=None)
    return decision


def decision_problem(decision: dict, stage_arms: list[dict], stages: StagesConfig) -> str | None:
    """Why ``decision`` (a stage<k>.json on the stage whose arms are ``stage_arms``) does not follow from
    its own ranking by the rule decide applies, or None: what advanced, the winner, and the arms the
    next stage was built from."""
    k, ranking = decision["stage"], decision.get("ranking") or []
    if k == 1:
        top = best_arms(ranking, stages.advance, exclude=[stages.baseline])
        expected = {"advanced": top}
        from_arms = top + ([stages.baseline] if stages.baseline in {a["name"] for a in stage_arms} else [])
    elif k == 2:
        top = best_arms(ranking, 1, exclude=[a["name"] for a in stage_arms if a["from_arm"] == stages.baseline])
        expected = {"advanced": top, "winner": top[0] if top else None}
        from_arms = None  # every factorial arm is built from the winner
    else:
        expected, from_arms = {"winner": ranking[0]["arm"] if ranking else None}, None
    wrong = [f"{key} {decision.get(key)!r}, but its ranking gives {value!r}" for key, value in expected.items()
             if decision.get(key) != value]
    nxt = decision.get("next")
    if nxt is not None:
        built_from = [a.get("from_arm") for a in nxt.get("arms", [])]
        want = from_arms if from_arms is not None else [expected["winner"]] * len(built_from)
        if built_from != want:
            wrong.append(f"stage {k + 1}'s arms are built from {built_from}, but its ranking gives {want}")
    return "; ".join(wrong) or None
