"""A staged study's results (campaign.stages): the scan, the full runs, the factorial, the winner.

Load: the stage decisions the campaign directory keeps (``stages/stage<k>.json``), which name each
later stage's cells and the factorial levels of each. Frames and statistics: per arm the mean held-out
loss and run time (training + probe) of its ok rows; the factorial's main effects and interaction over
seeds (stats.factorial_effects); the winner against standard LoRA at the same steps. Rendering is
report.render_staged, which takes this module's dict.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from aletheia_hpc.row import read_stage_decision, run_time_s

from .stats import factorial_effects


def load_stage_decisions(campaign_dir: Path | str) -> list[dict]:
    """stage1.json, stage2.json, ... in order, up to the first one missing (row.read_stage_decision)."""
    out = []
    while (decision := read_stage_decision(campaign_dir, len(out) + 1)) is not None:
        out.append(decision)
    return out


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _arm_rows(members: list[tuple[str, dict]]) -> list[dict]:
    """Per arm (in first-seen order) over (arm, ok row) pairs: n, eval loss and time mean (SD), steps."""
    by_arm: dict[str, list[dict]] = {}
    for arm, row in members:
        by_arm.setdefault(arm, []).append(row)
    out = []
    for arm, rows in by_arm.items():
        losses = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
        times = [t for r in rows if (t := run_time_s(r)) is not None]
        out.append({"arm": arm, "n": len(rows), "seeds": sorted(r["seed"] for r in rows),
                    "steps": sorted({r.get("train_steps") for r in rows}),
                    "eval_loss": _mean(losses), "eval_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
                    "time_s": _mean(times), "time_s_sd": statistics.stdev(times) if len(times) > 1 else None})
    return out


def _with_decision(table: list[dict], decision: dict) -> list[dict]:
    """The table with each arm's rank and whether it advanced; arms the decision saw without an ok row
    (failed cells, with --advance-with-failures) are listed with n = 0."""
    seen = {t["arm"] for t in table}
    table = table + [{"arm": arm, "n": 0, "seeds": [], "steps": [], "eval_loss": None, "eval_loss_sd": None,
                      "time_s": None, "time_s_sd": None} for arm in decision.get("unranked") or [] if arm not in seen]
    ranks = {f["arm"]: f["rank"] for f in decision["ranking"]}
    advanced = set(decision.get("advanced") or [])
    for t in table:
        t["rank"] = ranks.get(t["arm"])
        t["advanced"] = t["arm"] in advanced or t["arm"] == decision.get("baseline")
    return sorted(table, key=lambda t: (t["rank"] is None, t["rank"] or 0, t["arm"]))


def _versus(arm: dict | None, std: dict | None, label: str) -> dict | None:
    if not arm or not std or arm["time_s"] is None or std["time_s"] is None:
        return None
    return {"comparison": label, "arm": arm["arm"], "standard": std["arm"], "n_arm": arm["n"], "n_standard": std["n"],
            "arm_time_s": arm["time_s"], "standard_time_s": std["time_s"],
            "time_ratio": std["time_s"] / arm["time_s"] if arm["time_s"] else None,
            "arm_eval_loss": arm["eval_loss"], "standard_eval_loss": std["eval_loss"],
            "eval_loss_diff": (arm["eval_loss"] - std["eval_loss"])
            if arm["eval_loss"] is not None and std["eval_loss"] is not None else None}


def staged_stats(rows: list[dict], decisions: list[dict], paper: dict | None = None) -> dict:
    """The staged study's tables and statistics from its ok rows and its stage decisions."""
    ok = {r["cell_id"]: r for r in rows if r.get("status") == "ok"}
    out: dict = {"n_stages_decided": len(decisions), "paper": paper or {}, "scan": [], "full": [],
                 "factorial": None, "versus_standard": [], "stage2_winner": None, "winner": None, "ffn_only": None,
                 "study_complete": False}
    if not decisions:
        return out
    first = decisions[0]
    scan_arms = {f["arm"] for f in first["ranking"]} | set(first.get("unranked") or [])
    out["models"] = sorted({r["model"] for r in ok.values()})
    out["baseline"] = first.get("baseline")
    out["scan"] = _with_decision(_arm_rows([(r["arm"], r) for r in ok.values() if r["arm"] in scan_arms]), first)
    out["objective"] = first["objective"]
    if first["next"]:
        stage2 = [(m["arm"], ok[m["cell_id"]]) for m in first["next"]["cells"] if m["cell_id"] in ok]
        full = _arm_rows(stage2)
        out["full"] = _with_decision(full, decisions[1]) if len(decisions) > 1 else full
        baseline = first.get("baseline")
        std = next((a for a in first["next"]["arms"] if a["from_arm"] == baseline), None) if baseline else None
        std_row = next((t for t in full if std and t["arm"] == std["name"]), None)
        if len(decisions) > 1:
            winner = next((t for t in full if t["arm"] == decisions[1].get("winner")), None)
            out["stage2_winner"] = out["winner"] = decisions[1].get("winner")
            out["versus_standard"].append(_versus(winner, std_row, "stage-2 winner vs standard LoRA, same steps and seeds"))
        if len(decisions) > 1 and decisions[1]["next"]:
            spec = decisions[1]["next"]
            members = [(m, ok[m["cell_id"]]) for m in spec["cells"] if m["cell_id"] in ok]
            out["factorial"] = _factorial(spec, members)
            if len(decisions) > 2:
                out["winner"] = decisions[2]["winner"]
                out["study_complete"] = decisions[2]["next"] is None
                combos = {t["arm"]: t for t in out["factorial"]["combinations"]}
                out["versus_standard"].append(_versus(combos.get(out["winner"]), std_row,
                                                      "factorial winner (mean over its seeds) vs standard LoRA"))
                out["ffn_only"] = _ffn_only(out["factorial"], combos.get(out["winner"]))
    out["versus_standard"] = [v for v in out["versus_standard"] if v]
    return out


def _factorial(spec: dict, members: list[tuple[dict, dict]]) -> dict:
    factors = spec["factors"]
    levels = [list(dict.fromkeys(a["levels"][f] for a in spec["arms"])) for f in factors]
    table = _arm_rows([(m["arm"], row) for m, row in members])
    levels_of = {a["name"]: a["levels"] for a in spec["arms"]}
    for t in table:
        t["levels"] = levels_of[t["arm"]]
    effects = {}
    for metric, value in (("eval_loss", lambda r: r.get("eval_loss")), ("time_s", run_time_s)):
        values = {(m["levels"][factors[0]], m["levels"][factors[1]], m["seed"]): v
                  for m, row in members if (v := value(row)) is not None}
        effects[metric] = factorial_effects(values, (factors[0], factors[1]), (levels[0], levels[1]))
    return {"factors": factors, "levels": dict(zip(factors, levels)), "seeds": spec["seeds"],
            "n_runs": len(members), "combinations": table, "effects": effects}


def _ffn_only(factorial: dict, winner: dict | None) -> dict | None:
    """The paper's "FFN-only at the same lr" beside the winner: the combination with modules=mlp and the
    winner's other level, when the factorial has a ``modules`` factor."""
    if winner is None or "modules" not in factorial["factors"] or winner["levels"]["modules"] == "mlp":
        return None
    want = {**winner["levels"], "modules": "mlp"}
    ffn = next((t for t in factorial["combinations"] if t["levels"] == want), None)
    return _versus(ffn, winner, "FFN-only at the winner's other level vs the winner") if ffn else None
