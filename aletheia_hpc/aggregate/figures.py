"""PNG figures of a campaign (matplotlib, Agg canvas; pyplot and its global state are not used).

Each ``fig_*`` function returns the path it wrote, or raises ``SkipFigure`` with the reason when
the campaign lacks the data for it; ``make_figures`` collects both.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import numpy as np

from aletheia_hpc.evaluation.benchmarks import REGISTRY

from .paper import PaperReference, reference_key
from .tables import BENCH_FIELDS

FIGURE_FILES = {
    "speedup_per_model": "speedup_per_model.png",
    "speedup_by_family": "speedup_by_family.png",
    "benchmark_deltas": "benchmark_deltas.png",
    "speed_quality": "speed_quality_tradeoff.png",
    "layer_scores": "layer_scores_heatmap.png",
    "arms_pareto": "arms_speed_quality.png",
    "compute_matched_deltas": "compute_matched_deltas.png",
}
FIGURE_TITLES = {
    "speedup_per_model": "Training speedup per model (mean over seeds, 95% CI)",
    "speedup_by_family": "Training speedup by family (95% CI)",
    "benchmark_deltas": "Benchmark differences, Aletheia - Standard (pp, 95% CI)",
    "speed_quality": "Speed-quality trade-off: speedup vs extra MMLU forgetting",
    "layer_scores": "Per-layer probe scores (normalised) with selected layers marked",
    "arms_pareto": "Speed vs quality of every arm against Standard, per model (95% CIs)",
    "compute_matched_deltas": "Benchmark change from base: Standard, Aletheia and compute-matched Aletheia "
                              "(paper Figure 4)",
}
BENCH_LABELS = {b.name: b.label for b in REGISTRY.values()}


class SkipFigure(Exception):
    """The campaign has no data for this figure; the message says what is missing."""


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _err(block: dict, key: str) -> tuple[float, float]:
    """Lower / upper error-bar lengths from a ``*_ci95`` pair; zero when the CI is undefined."""
    ci = block.get(key)
    mean = block.get(key.replace("_ci95", "_mean"))
    if ci is None or mean is None:
        return 0.0, 0.0
    return max(mean - ci[0], 0.0), max(ci[1] - mean, 0.0)


def _variant_blocks(groups: dict, variant: str) -> list[tuple[str, dict]]:
    out = []
    for name, by_variant in groups.items():
        block = by_variant.get(variant)
        if block and block.get("n_pairs"):
            out.append((name, block))
    return out


def fig_speedup_per_model(stats: dict, variant: str, ref: PaperReference, path: Path) -> Path:
    blocks = _variant_blocks(stats["per_model"], variant)
    if not blocks:
        raise SkipFigure(f"no Standard/Aletheia pairs in variant {variant!r}")
    names = [m for m, _ in blocks]
    means = [b["speedup_pct_mean"] for _, b in blocks]
    errs = np.array([_err(b, "speedup_pct_ci95") for _, b in blocks]).T
    fig = _new_figure(max(6.0, 0.6 * len(names) + 2), 4.5)
    ax = fig.add_subplot(111)
    x = np.arange(len(names))
    ax.bar(x, means, yerr=errs, capsize=4, color="#4C72B0", label="this run (mean, 95% CI)")
    paper_x, paper_y = [], []
    for i, m in enumerate(names):
        ref_row = ref.speed.get(reference_key(m))
        if ref_row and ref_row.get("speedup_pct") is not None:
            paper_x.append(i)
            paper_y.append(ref_row["speedup_pct"])
    if paper_x:
        ax.scatter(paper_x, paper_y, marker="D", color="#DD8452", zorder=3, label="paper")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("speedup % = (1 - t_ale / t_std) x 100")
    ax.set_title(f"{FIGURE_TITLES['speedup_per_model']} [{variant}]")
    ax.legend()
    return _save(fig, path)


def fig_speedup_by_family(stats: dict, variant: str, path: Path) -> Path:
    blocks = _variant_blocks(stats["per_family"], variant)
    if not blocks:
        raise SkipFigure(f"no Standard/Aletheia pairs in variant {variant!r}")
    names = [f for f, _ in blocks]
    means = [b["speedup_pct_mean"] for _, b in blocks]
    errs = np.array([_err(b, "speedup_pct_ci95") for _, b in blocks]).T
    fig = _new_figure(max(5.0, 0.7 * len(names) + 2), 4.0)
    ax = fig.add_subplot(111)
    x = np.arange(len(names))
    ax.bar(x, means, yerr=errs, capsize=4, color="#55A868")
    for i, (_, b) in enumerate(blocks):
        ax.annotate(f"n={b['n_pairs']}", (i, 0), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("speedup %")
    ax.set_title(f"{FIGURE_TITLES['speedup_by_family']} [{variant}]")
    return _save(fig, path)


def fig_benchmark_deltas(stats: dict, variant: str, path: Path) -> Path:
    blocks = _variant_blocks(stats["per_model"], variant)
    benches = [b for b in BENCH_FIELDS
               if any((blk.get("quality") or {}).get(b) for _, blk in blocks)]
    if not benches:
        raise SkipFigure(f"no benchmark results on both recipes in variant {variant!r}")
    fig = _new_figure(max(6.5, 4.2 * len(benches) + 1), max(3.0, 0.35 * len(blocks) + 1.5))
    for k, bench in enumerate(benches):
        ax = fig.add_subplot(1, len(benches), k + 1)
        rows = [(m, blk["quality"][bench]) for m, blk in blocks if (blk.get("quality") or {}).get(bench)]
        y = np.arange(len(rows))
        means = [q["diff_mean"] for _, q in rows]
        errs = np.array([_err(q, "diff_ci95") for _, q in rows]).T
        ax.barh(y, means, xerr=errs, capsize=3, color="#8172B2")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([m for m, _ in rows] if k == 0 else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_xlabel(f"{BENCH_LABELS[bench]}: Aletheia - Standard (pp)")
    fig.suptitle(f"Aletheia - Standard (pp), mean and 95% CI over seeds [{variant}]")
    return _save(fig, path)


def fig_speed_quality(stats: dict, variant: str, path: Path) -> Path:
    blocks = [(m, b) for m, b in _variant_blocks(stats["per_model"], variant)
              if (b.get("quality") or {}).get("mmlu")]
    if not blocks:
        raise SkipFigure(f"no MMLU results on both recipes in variant {variant!r}")
    fig = _new_figure(6.5, 4.5)
    ax = fig.add_subplot(111)
    for m, b in blocks:
        q = b["quality"]["mmlu"]
        # extra forgetting = (ale - base) - (std - base) = ale - std, so it needs no base row
        extra = q.get("extra_pp_mean", q["diff_mean"])
        ci_key = "extra_pp_ci95" if "extra_pp_mean" in q else "diff_ci95"
        yerr = np.array(_err({"x_mean": extra, "x_ci95": q.get(ci_key)}, "x_ci95")).reshape(2, 1)
        xerr = np.array(_err(b, "speedup_pct_ci95")).reshape(2, 1)
        ax.errorbar(b["speedup_pct_mean"], extra, xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(m, (b["speedup_pct_mean"], extra), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup % (mean over seeds)")
    ax.set_ylabel("extra MMLU forgetting (pp)")
    ax.set_title(f"Speed vs quality [{variant}]\ny = Aletheia delta - Standard delta "
                 "(> 0: Aletheia forgot less)", fontsize=10)
    return _save(fig, path)


def _pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point beats on both axes (higher speedup, lower loss)."""
    front = set()
    for i, (x, y) in enumerate(points):
        if not any(xo >= x and yo <= y and (xo, yo) != (x, y) for xo, yo in points):
            front.add(i)
    return front


def fig_arms_pareto(stats: dict, path: Path) -> Path:
    """One panel per model: each arm's speedup vs its eval-loss difference from Standard (Standard
    at the origin), 95% CI bars; the arms on the speed-quality front are filled."""
    arms = stats.get("arms") or {}
    models = list(dict.fromkeys(m for e in arms.values() for m in e["per_model"]))
    panels = []
    for model in models:
        points = []
        for arm, entry in arms.items():
            b = entry["per_model"].get(model)
            loss = ((b or {}).get("quality") or {}).get("eval_loss")
            if b and b.get("speedup_pct_mean") is not None and loss:
                points.append((arm, b, loss))
        if points:
            panels.append((model, points))
    if not panels or all(len(p) < 2 for _, p in panels):
        raise SkipFigure("fewer than two arms with timing and eval loss against Standard")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _new_figure(5.2 * cols, 4.2 * rows)
    for k, (model, points) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        xy = [(0.0, 0.0)] + [(b["speedup_pct_mean"], loss["diff_mean"]) for _, b, loss in points]
        front = _pareto_front(xy)
        ax.plot(0, 0, "s", color="black")
        ax.annotate("standard", (0, 0), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for i, (arm, b, loss) in enumerate(points, start=1):
            xerr = np.array(_err(b, "speedup_pct_ci95")).reshape(2, 1)
            yerr = np.array(_err(loss, "diff_ci95")).reshape(2, 1)
            ax.errorbar(*xy[i], xerr=xerr, yerr=yerr, fmt="o", capsize=3,
                        markerfacecolor=None if i in front else "white")
            ax.annotate(arm, xy[i], textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.axvline(0, color="grey", linewidth=0.6)
        ax.set_xlabel("speedup vs standard % (mean, 95% CI)")
        ax.set_ylabel("eval loss: arm - standard")
        ax.set_title(model, fontsize=10)
    fig.suptitle("Speed vs quality per arm (filled: on the front; up = worse loss)")
    return _save(fig, path)


def fig_compute_matched_deltas(stats: dict, path: Path) -> Path:
    """The paper's Figure 4: per model and benchmark, the change from the base model of Standard,
    matched Aletheia and compute-matched Aletheia (pp, mean and 95% CI over seeds)."""
    cm = stats.get("compute_matched", {}).get("per_model") or {}
    panels = []
    for model, cm_block in cm.items():
        matched = stats["per_model"].get(model, {}).get("matched") or {}
        for bench in BENCH_FIELDS:
            q_cm = (cm_block.get("quality") or {}).get(bench) or {}
            q_m = (matched.get("quality") or {}).get(bench) or {}
            if q_cm.get("arm_delta_pp_mean") is not None and q_m.get("std_delta_pp_mean") is not None:
                panels.append((model, bench, [("Standard", q_m, "std_delta_pp"), ("Aletheia", q_m, "arm_delta_pp"),
                                              ("Aletheia compute-matched", q_cm, "arm_delta_pp")]))
    if not panels:
        raise SkipFigure("no compute_matched pairs with benchmark results and a base-model row")
    models = list(dict.fromkeys(m for m, _, _ in panels))
    benches = [b for b in BENCH_FIELDS if any(b == pb for _, pb, _ in panels)]
    fig = _new_figure(max(6.5, 3.6 * len(benches)), 3.0 + 0.9 * len(models))
    colours = ("#4C72B0", "#DD8452", "#55A868")
    for k, bench in enumerate(benches):
        ax = fig.add_subplot(1, len(benches), k + 1)
        mine = [(m, bars) for m, b, bars in panels if b == bench]
        y = np.arange(len(mine))
        for j, label in enumerate(("Standard", "Aletheia", "Aletheia compute-matched")):
            means, errs = [], []
            for _, bars in mine:
                _, q, key = bars[j]
                mean = q.get(f"{key}_mean")
                sd, n = q.get(f"{key}_sd"), q.get("n_with_base") or 0
                means.append(mean)
                # a t-interval from the delta's SD over seeds (base is one row, so its SD is the delta's)
                half = 0.0 if sd is None or n < 2 else float(sd) * _t975(n - 1) / np.sqrt(n)
                errs.append(half)
            ax.barh(y + (j - 1) * 0.27, means, height=0.27, xerr=errs, capsize=2, color=colours[j], label=label)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([m for m, _ in mine] if k == 0 else [""] * len(mine))
        ax.invert_yaxis()
        ax.set_xlabel(f"{BENCH_LABELS[bench]}: fine-tuned - base (pp)")
        if k == 0:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Benchmark change from the base model: Standard, Aletheia, compute-matched Aletheia")
    return _save(fig, path)


def _t975(df: int) -> float:
    from scipy import stats as sps

    return float(sps.t.ppf(0.975, df))


def _as_floats(values: list) -> np.ndarray:
    try:
        return np.array(values, dtype=float)
    except (TypeError, ValueError):  # a non-number among them: NaN there
        return np.array([v if isinstance(v, (int, float)) else np.nan for v in values], dtype=float)


def layer_score_summary(rows: list[dict]) -> dict[str, dict]:
    """Per model: mean per-layer probe score (each run scaled to max 1) and selection frequency."""
    by_model: dict[str, list[tuple[list, list]]] = {}
    for row in rows:
        scores = row.get("layer_scores")
        if row.get("recipe") == "aletheia" and isinstance(scores, list) and scores:
            by_model.setdefault(row.get("model"), []).append((scores, row.get("selected_layers") or []))
    out = {}
    for model, runs in by_model.items():
        width = max(len(scores) for scores, _ in runs)
        sizes = np.array([len(scores) for scores, _ in runs])
        grid = np.full((len(runs), width), np.nan)
        if (sizes == width).all():  # the usual case: one layer count, one conversion
            grid[:] = _as_floats([scores for scores, _ in runs])
        else:
            for i, (scores, _) in enumerate(runs):
                grid[i, : len(scores)] = _as_floats(scores)
        top = np.nanmax(np.abs(grid), axis=1, initial=0.0)  # each run scaled to its largest |score|
        top[~np.isfinite(grid).any(axis=1)] = 0.0
        with np.errstate(invalid="ignore"):
            grid = np.where((top > 0)[:, None], grid / np.where(top > 0, top, 1.0)[:, None], grid)
        chosen = np.where(np.arange(width)[None, :] < sizes[:, None], 0.0, np.nan)
        # every run's selected layers as one (run, layer) index pair list; non-integers are ignored
        picks = [[x for x in selected if isinstance(x, int)] for _, selected in runs]
        run_of = np.repeat(np.arange(len(runs)), [len(p) for p in picks])
        layer = np.fromiter(chain.from_iterable(picks), dtype=np.int64, count=run_of.size)
        inside = (layer >= 0) & (layer < sizes[run_of])
        chosen[run_of[inside], layer[inside]] = 1.0
        with np.errstate(invalid="ignore"):
            out[model] = {"score": np.nanmean(grid, axis=0), "selected_freq": np.nanmean(chosen, axis=0),
                          "n_runs": len(runs)}
    return out


def fig_layer_scores(summary: dict[str, dict], order: list[str], path: Path) -> Path:
    models = [m for m in order if m in summary] + [m for m in summary if m not in order]
    if not models:
        raise SkipFigure("no Aletheia row carries layer_scores")
    width = max(summary[m]["score"].size for m in models)
    grid = np.full((len(models), width), np.nan)
    for i, m in enumerate(models):
        grid[i, : summary[m]["score"].size] = summary[m]["score"]
    fig = _new_figure(min(18.0, max(7.5, 0.18 * width + 4)), max(3.0, 0.4 * len(models) + 1.8))
    ax = fig.add_subplot(111)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="score / run max (mean)")
    xs, ys = [], []
    for i, m in enumerate(models):
        freq = summary[m]["selected_freq"]
        picked = np.flatnonzero(np.nan_to_num(freq) >= 0.5)
        xs.extend(picked.tolist())
        ys.extend([i] * picked.size)
    if xs:
        ax.scatter(xs, ys, marker="o", s=14, facecolors="none", edgecolors="red")
    ax.set_yticks(np.arange(len(models)))
    ax.set_yticklabels([f"{m} (n={summary[m]['n_runs']})" for m in models])
    ax.set_xlabel("layer index")
    ax.set_title("Probe score per layer; red circle = selected in >= half of the runs", fontsize=10)
    return _save(fig, path)


def make_figures(stats: dict, rows: list[dict], variant: str, ref: PaperReference, fig_dir: Path,
                 model_order: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """Write every figure that has data; returns (name -> path, name -> reason it was skipped)."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    makers = {
        "speedup_per_model": lambda p: fig_speedup_per_model(stats, variant, ref, p),
        "speedup_by_family": lambda p: fig_speedup_by_family(stats, variant, p),
        "benchmark_deltas": lambda p: fig_benchmark_deltas(stats, variant, p),
        "speed_quality": lambda p: fig_speed_quality(stats, variant, p),
        "layer_scores": lambda p: fig_layer_scores(layer_score_summary(rows), model_order, p),
        "arms_pareto": lambda p: fig_arms_pareto(stats, p),
        "compute_matched_deltas": lambda p: fig_compute_matched_deltas(stats, p),
    }
    written: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name, make in makers.items():
        path = fig_dir / FIGURE_FILES[name]
        try:
            written[name] = make(path)
        except SkipFigure as exc:
            path.unlink(missing_ok=True)  # never leave a stale figure from an earlier aggregation
            skipped[name] = str(exc)
    return written, skipped

