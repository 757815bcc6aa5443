"""From Hydra configs to campaign cells: compose, expand the matrix, validate every cell.

Each (model, recipe) pair is composed by Hydra with the user's overrides on top, so every cell
is typed and resolved exactly as ``run-cell`` would resolve it alone.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aletheia_hpc.config import (STAGE_OBJECTIVES, TIMINGS, CellConfig, ClusterConfig, ConfigError, FaultConfig,
                                 PairedTimingConfig, RecipeConfig, RootConfig, TimingArmConfig, VariantConfig,
                                 validate_cell, validate_cluster)
from aletheia_hpc.campaign.stages import decision_problem, merge_overrides, override_key
from aletheia_hpc.data.builtin import BUILTIN_NAME
from aletheia_hpc.provenance import REPO_ROOT
from aletheia_hpc.row import TIMING_RECIPE, arm_name

ConfigStore.instance().store(name="schema", node=RootConfig)


def conf_dir() -> Path:
    """The Hydra config root; ALETHEIA_CONF points elsewhere (a site's own copy)."""
    return Path(os.environ.get("ALETHEIA_CONF", REPO_ROOT / "conf")).resolve()


def compose_root(overrides: list[str]) -> RootConfig:
    """The typed root config for ``overrides`` (Hydra syntax); errors name the bad field. Paths to
    local files come back absolute: jobs run in a code snapshot, not where the user launched."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return _absolute_paths(OmegaConf.to_object(cfg))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config error: {_merge_error(exc)}".replace("\n", " ")) from exc
    finally:
        GlobalHydra.instance().clear()


def _merge_error(exc: Exception) -> str:
    """Hydra's "Error merging override X" with the reason it keeps in its cause: which field, and the
    type that field takes (e.g. campaign.seeds[0]: Value 'a' of type 'str' could not be converted to Integer)."""
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "msg", None):
        key = getattr(cause, "full_key", None)
        return f"{exc}: " + (f"{key}: " if key else "") + str(cause.msg).splitlines()[0]
    return str(exc)


def _absolute_paths(root: RootConfig) -> RootConfig:
    m, d, e = root.model, root.data, root.eval
    if m.kind == "local" or (m.kind == "gguf" and not m.path.startswith("package:")):
        m.path = os.path.abspath(os.path.expanduser(m.path)) if m.path else m.path
    if d.source != BUILTIN_NAME and not d.source.startswith("hub:"):
        d.source = os.path.abspath(os.path.expanduser(d.source))
    if e.data_dir:
        e.data_dir = os.path.abspath(os.path.expanduser(e.data_dir))
    return root


def option_names(group: str) -> list[str]:
    """The config names available in a group (model, recipe, cluster, campaign)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _faults_for(campaign, model: str, recipe: str, seed: int, variant: str) -> FaultConfig:
    key = f"{model}/{recipe}/{seed}/{variant}"
    for pattern, faults in campaign.faults.items():
        if fnmatch.fnmatch(key, pattern) or fnmatch.fnmatch(key, pattern + "/*"):
            return faults
    return FaultConfig()


@dataclass
class StagePlan:
    """One stage of a staged study: its arms (name, recipe, variant, overrides, steps), seeds, and cells
    ({cell_id, arm, seed, levels}; a cell equal to an earlier stage's is that cell). ``decision``: the
    stage<k>.json written once the stage was complete, or None while it is not decided."""
    stage: int
    arms: list[dict]
    seeds: list[int]
    cells: list[dict]
    decision: dict | None = None

    def to_dict(self) -> dict:
        return {"stage": self.stage, "arms": self.arms, "seeds": self.seeds, "cells": self.cells}


@dataclass
class Plan:
    name: str
    root: RootConfig  # the campaign-level config (cluster, results_dir, ...)
    cells: list[CellConfig]
    overrides: list[str] = field(default_factory=list)  # what expand was given: planning again starts here
    stages: list[StagePlan] = field(default_factory=list)  # a staged study's stages decided so far

    @property
    def current_stage(self) -> StagePlan | None:
        return self.stages[-1] if self.stages else None

    @property
    def study_complete(self) -> bool:
        """The last stage is decided: nothing further follows."""
        return bool(self.stages) and self.stages[-1].decision is not None and self.stages[-1].decision["next"] is None


_key = override_key  # the field an override sets


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if _key(o) not in keys]


_EXAMPLE = {"models": "tiny-llama", "recipes": "standard,aletheia", "seeds": "42"}
# override key given with a campaign -> the campaign field to use instead
_CELL_AXES = {"model": "campaign.models=[...]", "recipe": "campaign.recipes=[...]",
              "seed": "campaign.seeds=[...]", "variant": "campaign.variants=[...]"}
# what a variant's overrides may not set (besides choosing a model or recipe config; their fields,
# model.* and recipe.*, may be set): the axes the variant has fields for, and where cells run
_NOT_IN_VARIANT = ("seed", "variant", "campaign", "cluster", "results_dir", "progress")


def _refuse_cell_axes(overrides: list[str]) -> None:
    """A campaign decides each cell's model, recipe, seed and variant; the same keys on the command
    line would be dropped silently, so they are refused."""
    problems = [f"{o!r} does not apply to a campaign, whose cells each set their own {_key(o)}; "
                f"use {_CELL_AXES[_key(o)]} (or run one cell with run-cell)"
                for o in overrides if _key(o) in _CELL_AXES]
    if problems:
        raise ConfigError("; ".join(problems))


def _variant_problems(campaign) -> list[str]:
    problems, seen = [], set()
    for v in campaign.variants:
        if v.name in seen:
            problems.append(f"campaign.variants: two variants are named {v.name!r}; give each its own name")
        seen.add(v.name)
        if v.name in ("base", TIMING_RECIPE) or "@" in v.name or "/" in v.name:
            problems.append(f"campaign.variants: name {v.name!r} is reserved or has '@' or '/'")
        for o in v.overrides:
            key = _key(o)
            if "=" not in o:
                problems.append(f"campaign.variants[{v.name}].overrides: {o!r} is not key=value")
            elif key in ("model", "recipe") or key.split(".")[0] in _NOT_IN_VARIANT:
                problems.append(f"campaign.variants[{v.name}].overrides: {o!r} cannot be set per variant; "
                                "use the variant's models/recipes/steps fields or the campaign's seeds")
    return problems


def expand(overrides: list[str]) -> Plan:
    """Every cell of the campaign selected by ``overrides``; ConfigError lists every bad cell."""
    _refuse_cell_axes(overrides)
    root = compose_root(overrides)
    validate_cluster(root.cluster)
    campaign = root.campaign
    if campaign.parts:
        cells = []
        base = _without(overrides, "campaign")
        for part in campaign.parts:
            cells += expand(base + [f"campaign={part}"]).cells  # each part checks its own cells
        return Plan(campaign.name, root, cells, list(overrides))

    for axis in ("models", "recipes", "seeds"):
        if not getattr(campaign, axis):
            raise ConfigError(f"campaign {campaign.name!r} lists no {axis} (campaign.{axis}=[]): it would have no "
                              f"cells; give at least one, e.g. campaign.{axis}=[{_EXAMPLE[axis]}]")
    known = {"models": set(option_names("model")), "recipes": set(option_names("recipe"))}
    problems = []
    for axis, kind in (("models", "model"), ("recipes", "recipe")):
        # each unknown name blamed on the list that holds it: the campaign's, or a variant's own
        lists = [(f"campaign.{axis}", getattr(campaign, axis))]
        lists += [(f"campaign.variants[{v.name}].{axis}", getattr(v, axis) or []) for v in campaign.variants]
        problems += [f"{where}: unknown {kind} {name!r}; known: {', '.join(sorted(known[axis]))}"
                     for where, names in lists for name in dict.fromkeys(names) if name not in known[axis]]
    problems += _variant_problems(campaign) + _timing_problems(campaign)
    if problems:
        raise ConfigError("; ".join(problems))

    compose = _Composer(overrides, campaign)
    cells: list[CellConfig] = []
    for variant in campaign.variants:
        for model in variant.models or campaign.models:
            for recipe in variant.recipes or campaign.recipes:
                cells += compose.cells(model, recipe, variant, campaign.seeds)
    if campaign.base_eval:
        for model in dict.fromkeys(m for v in campaign.variants for m in (v.models or campaign.models)):
            r = compose.root(model, "base")
            cells.append(CellConfig(campaign=campaign.name, model=r.model, recipe=r.recipe,
                                    train=r.train, data=r.data, eval=r.eval, seed=0, variant="base",
                                    noop=campaign.noop))
    if campaign.timing == "paired":
        cells += timing_cells(campaign, cells)
    plan = Plan(campaign.name, root, cells, list(overrides))
    if campaign.staged:
        _plan_stages(plan, compose)
    check_cells(plan.cells)
    return plan


class _Composer:
    """Composes (model, recipe, extra overrides) once each, and makes the cells of a variant."""

    def __init__(self, overrides: list[str], campaign):
        self.overrides, self.campaign, self.composed = list(overrides), campaign, {}

    def root(self, model: str, recipe: str, variant: VariantConfig | None = None) -> RootConfig:
        extra = list(variant.overrides) if variant else []
        if variant is not None and variant.steps is not None:
            extra.append(f"train.steps={variant.steps}")
        key = (model, recipe, tuple(extra))
        if key not in self.composed:
            try:
                self.composed[key] = compose_root(self.overrides + [f"model={model}", f"recipe={recipe}", *extra])
            except ConfigError as exc:
                where = f"campaign.variants[{variant.name}].overrides" if extra else f"{model}/{recipe}"
                raise ConfigError(f"{where}: {exc}") from exc
        return self.composed[key]

    def cells(self, model: str, recipe: str, variant: VariantConfig, seeds: list[int]) -> list[CellConfig]:
        r = self.root(model, recipe, variant)
        return [CellConfig(campaign=self.campaign.name, model=r.model, recipe=r.recipe, train=r.train, data=r.data,
                           eval=r.eval, seed=seed, variant=variant.name, noop=self.campaign.noop,
                           faults=_faults_for(self.campaign, model, recipe, seed, variant.name))
                for seed in seeds]


# ------------------------------------------------------------------ staged studies


def _stage_problems(campaign, stage1_arms: list[dict]) -> list[str]:
    st, problems = campaign.stages, []
    candidates = [a["name"] for a in stage1_arms if a["name"] != st.baseline]
    if campaign.parts or len(campaign.models) != 1:
        problems.append("campaign.stages: a staged study runs on one model (campaign.models) and has no parts")
    if st.objective not in STAGE_OBJECTIVES:
        problems.append(f"campaign.stages.objective={st.objective!r}: use one of {STAGE_OBJECTIVES}")
    if not 1 <= st.advance <= len(candidates):
        problems.append(f"campaign.stages.advance={st.advance}: must be between 1 and the {len(candidates)} "
                        "stage-1 arm(s) other than the baseline")
    if st.baseline and st.baseline not in {a["name"] for a in stage1_arms}:
        problems.append(f"campaign.stages.baseline={st.baseline!r}: not a stage-1 arm (arms: "
                        f"{', '.join(a['name'] for a in stage1_arms)}); add it or set baseline: ''")
    if st.full_steps <= 0 or st.loss_decimals < 0 or st.time_weight < 0:
        problems.append("campaign.stages.full_steps must be > 0, loss_decimals and time_weight >= 0")
    if not st.factorial_seeds:
        problems.append("campaign.stages.factorial_seeds is empty: the factorial needs at least one seed")
    if len(st.factors) != 2 or any(len(f.levels) != 2 for f in st.factors):
        problems.append(f"campaign.stages.factors: give 2 factors of 2 levels each (the 2x2 design whose main "
                        f"effects and interaction aggregate reports); got {[(f.name, len(f.levels)) for f in st.factors]}")
    if len({f.name for f in st.factors}) != len(st.factors):
        problems.append("campaign.stages.factors: two factors have the same name")
    fields = [next(iter({_key(level) for level in f.levels}), "") for f in st.factors]
    for field_name in {k for k in fields if k and fields.count(k) > 1}:
        problems.append(f"campaign.stages.factors: {' and '.join(f.name for f, k in zip(st.factors, fields) if k == field_name)}"
                        f" both set {field_name}: the later level would overwrite the earlier, a degenerate design; "
                        "give each factor its own field")
    for f in st.factors:
        if not f.name or any(ch in f.name for ch in "@/=-"):
            problems.append(f"campaign.stages.factors: name {f.name!r} must be non-empty, without '@', '/', '=' or '-'")
        keys = {_key(level) for level in f.levels}
        for level in f.levels:
            key = _key(level)
            if "=" not in level or not level.split("=", 1)[1]:
                problems.append(f"campaign.stages.factors[{f.name}].levels: {level!r} is not key=value")
            elif key in ("model", "recipe") or key.split(".")[0] in _NOT_IN_VARIANT or key == "train.steps":
                problems.append(f"campaign.stages.factors[{f.name}].levels: {level!r} cannot be a factor level "
                                "(model, recipe, seed, steps and where cells run are the study's own)")
            elif any(ch in level.split("=", 1)[1] for ch in "@/"):
                problems.append(f"campaign.stages.factors[{f.name}].levels: {level!r}: a level's value names "
                                "the arm; no '@' or '/'")
        if len(keys) != 1:
            problems.append(f"campaign.stages.factors[{f.name}].levels: every level must set the same one field, "
                            f"got {sorted(keys)}")
    return problems


def _factorial_problems(campaign, stage1_arms: list[dict], compose: "_Composer") -> list[str]:
    """Every stage-3 combination of factor levels on every arm that could win stage 2, composed and
    validated as the cell it would be: a level is refused where a plain cell's value is."""
    st, problems = campaign.stages, []
    for arm in stage1_arms:
        if arm["name"] == st.baseline:
            continue
        for levels in itertools.product(*(f.levels for f in st.factors)):
            variant = VariantConfig(name="fx-check", recipes=[arm["recipe"]], steps=st.full_steps,
                                    overrides=merge_overrides(arm["overrides"], levels))
            where = " x ".join(f"campaign.stages.factors[{f.name}].levels {level}"
                               for f, level in zip(st.factors, levels)) + f" on arm {arm['name']}"
            try:
                (cell,) = compose.cells(campaign.models[0], arm["recipe"], variant, campaign.seeds[:1])
                validate_cell(cell)
            except ConfigError as exc:
                problems.append(f"{where}: {str(exc).replace('campaign.variants[fx-check].overrides: ', '')}")
    return list(dict.fromkeys(problems))


def _stage1_arms(campaign) -> list[dict]:
    return [{"name": arm_name(recipe, v.name), "recipe": recipe, "variant": v.name, "overrides": list(v.overrides),
             "steps": v.steps, "from_arm": None, "levels": {}}
            for v in campaign.variants for recipe in (v.recipes or campaign.recipes)]


def compose_stage(plan: Plan, compose: "_Composer", spec: dict) -> tuple[list[CellConfig], list[dict]]:
    """The new cells of the stage ``spec`` ({stage, arms, seeds}) and its members ({cell_id, arm,
    seed, levels}). A cell that computes what one of ``plan``'s cells computes is that cell (the
    factorial's corner equal to the stage-2 winner reruns nothing)."""
    known = {json.dumps(c.settings(), sort_keys=True, default=str): c.cell_id for c in plan.cells}
    model = compose.campaign.models[0]
    new, members = [], []
    for arm in spec["arms"]:
        variant = VariantConfig(name=arm["variant"], recipes=[arm["recipe"]], steps=arm["steps"],
                                overrides=list(arm["overrides"]))
        for cell in compose.cells(model, arm["recipe"], variant, spec["seeds"]):
            settings = json.dumps(cell.settings(), sort_keys=True, default=str)
            if settings not in known:
                known[settings] = cell.cell_id
                new.append(cell)
            members.append({"cell_id": known[settings], "arm": arm["name"], "seed": cell.seed,
                            "levels": arm["levels"]})
    return new, members


def next_stage(plan: Plan, decision: dict) -> tuple[list[CellConfig], list[dict]]:
    """The cells and members of the stage ``decision`` (on plan's current stage) calls for."""
    return compose_stage(plan, _Composer(plan.overrides, plan.root.campaign), decision["next"])


def _plan_stages(plan: Plan, compose: _Composer) -> None:
    """Stage 1 from the campaign's cells; then each stage<k>.json in the campaign directory gives stage
    k+1, composed again from the arms it recorded and checked against the cells it recorded."""
    from aletheia_hpc.campaign.store import read_stage_decision, stage_decision_path

    campaign = plan.root.campaign
    arms = _stage1_arms(campaign)
    problems = _stage_problems(campaign, arms)
    if not problems:  # a bad factor level fails now, not after stages 1 and 2 have run
        problems = _factorial_problems(campaign, arms, compose)
    if problems:
        raise ConfigError("; ".join(problems))
    members = [{"cell_id": c.cell_id, "arm": c.arm, "seed": c.seed, "levels": {}} for c in plan.cells]
    plan.stages.append(StagePlan(1, arms, list(campaign.seeds), members))
    results = Path(plan.root.results_dir)
    while (decision := read_stage_decision(results, campaign.name, plan.stages[-1].stage)) is not None:
        problem = decision_problem(decision, plan.stages[-1].arms, campaign.stages)
        if problem:
            raise ConfigError(f"{stage_decision_path(results, campaign.name, decision['stage'])}: {problem}; it was "
                              "edited by hand, or the config's stages changed since: restore it, or move it aside to "
                              f"decide stage {decision['stage']} again from its rows")
        plan.stages[-1].decision = decision
        if decision["next"] is None:
            break
        spec = decision["next"]
        new, members = compose_stage(plan, compose, spec)
        if [m["cell_id"] for m in members] != [m["cell_id"] for m in spec["cells"]]:
            raise ConfigError(
                f"{stage_decision_path(results, campaign.name, decision['stage'])} records stage {spec['stage']}'s "
                "cells, but the campaign's config now composes other ones: the config changed since that stage "
                "was decided; restore it, or move the stages directory aside to decide again from the rows")
        plan.cells += new
        plan.stages.append(StagePlan(spec["stage"], spec["arms"], spec["seeds"], members))


def _timing_problems(campaign) -> list[str]:
    problems = []
    if campaign.timing not in TIMINGS:
        problems.append(f"campaign.timing={campaign.timing!r}: use one of {TIMINGS}")
    if campaign.timing_steps < 1:
        problems.append(f"campaign.timing_steps={campaign.timing_steps}: the paired timing needs >= 1 timed round")
    if campaign.timing_warmup < 0:
        problems.append(f"campaign.timing_warmup={campaign.timing_warmup}: must be >= 0")
    if campaign.timing == "paired" and campaign.staged:
        problems.append("campaign.timing=paired with campaign.stages: a staged study's arms change from stage to "
                        "stage, and one timing cell per model times one set; set campaign.timing=sequential")
    return problems


def _first_difference(a, b, prefix: str) -> str | None:
    """The first dotted field where two config dicts differ, with both values, or None."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, f"{prefix}.{key}")
            if found:
                return found
        elif x != y:
            return f"{prefix}.{key} is {x!r} there and {y!r} for standard"
    return None


def _unpairable(arm: CellConfig, standard: CellConfig) -> str | None:
    """Why ``arm``'s steps cannot be timed beside ``standard``'s in one job, or None: both must
    train the same model on the same data in the same micro-batches (their optimizer settings and
    step counts may differ: they do not change what one step costs)."""
    if arm.model != standard.model:
        return _first_difference(asdict(arm.model), asdict(standard.model), "model")
    if arm.data != standard.data:
        return _first_difference(asdict(arm.data), asdict(standard.data), "data")
    for name in ("grad_accum", "max_grad_norm"):
        if getattr(arm.train, name) != getattr(standard.train, name):
            return (f"train.{name} is {getattr(arm.train, name)!r} there and {getattr(standard.train, name)!r} "
                    "for standard")
    return None


def timing_cells(campaign, cells: list[CellConfig]) -> list[CellConfig]:
    """One paired timing cell per model (campaign.timing=paired): every training arm of the model,
    built as its cell of the campaign's first seed builds it (same probe batches, same selection),
    timed interleaved in one job. Arms that do not train the same model on the same batches as
    standard cannot share its timing and are refused, as is a model without a standard arm."""
    seed = campaign.seeds[0]
    by_model: dict[str, dict[str, CellConfig]] = {}
    for cell in cells:
        if cell.trains and cell.seed == seed:
            by_model.setdefault(cell.model.name, {})[cell.arm] = cell
    problems, out = [], []
    for model, arms in by_model.items():
        standard = arms.get("standard")
        if standard is None:
            problems.append(f"campaign.timing=paired: model {model} has no standard arm to time the others "
                            "against; add standard to campaign.recipes or set campaign.timing=sequential")
            continue
        for name, cell in arms.items():
            why = _unpairable(cell, standard)
            if why:
                problems.append(f"campaign.timing=paired: model {model}: arm {name} cannot be timed beside "
                                f"standard in one job: {why}; drop the arm, give it its own campaign, or set "
                                "campaign.timing=sequential")
        ordered = sorted(arms, key=lambda name: name != "standard")  # standard first
        timing = PairedTimingConfig(arms=[TimingArmConfig(arm=name, recipe=arms[name].recipe) for name in ordered],
                                    rounds=campaign.timing_steps, warmup=campaign.timing_warmup)
        out.append(replace(standard, recipe=RecipeConfig(name=TIMING_RECIPE), variant=TIMING_RECIPE,
                           faults=FaultConfig(), timing=timing))
    if problems:
        raise ConfigError("; ".join(problems))
    return out


def cell_label(cell: CellConfig) -> str:
    return f"{cell.model.name}/{cell.arm}/seed={cell.seed}"


def check_cells(cells: list[CellConfig]) -> None:
    """Validate every cell; one ConfigError with a line per bad cell. Two cells whose settings are
    equal (two arms that resolve to the same cell) are refused with both names."""
    problems, seen_ids, seen_settings = [], {}, {}
    for cell in cells:
        label = f"{cell.campaign}:{cell_label(cell)}"
        try:
            validate_cell(cell)
        except ConfigError as exc:
            problems.append(f"cell {label}: {exc}")
        settings = json.dumps(cell.settings(), sort_keys=True, default=str)
        if cell.cell_id in seen_ids:
            problems.append(f"cell {label} duplicates cell {seen_ids[cell.cell_id]}")
        elif settings in seen_settings:
            problems.append(f"cell {label} resolves to the same settings as cell {seen_settings[settings]}: "
                            "the two arms would train the same thing; change one variant's overrides or drop it")
        seen_ids[cell.cell_id] = label
        seen_settings.setdefault(settings, label)
    if problems:
        raise ConfigError(f"{len(problems)} invalid cell(s):\n  " + "\n  ".join(problems))


def placement_problem(cell: CellConfig, cluster: ClusterConfig) -> str | None:
    """Why ``cell`` can never run as asked on ``cluster`` (and what to change), or None.

    ``cluster.gpus_per_node`` must be resolved: for a local cluster, the GPUs this machine shows
    (campaign.local.with_local_gpus). CPUs and memory are checked against SLURM nodes only: a local
    cell runs on whatever this machine has."""
    r = cell.model.resources
    shown = max(cluster.gpus_per_node, 0)
    if cluster.kind == "local" and r.gpus > shown and not cluster.cpu_fallback:
        return (f"asks for {r.gpus} GPU(s) but this machine shows {shown}; launch it "
                "on a SLURM cluster (cluster=<profile>), or run it on the CPU with model.resources.gpus=0 "
                "model.precision=fp32")
    if cluster.kind != "slurm":
        return None
    if cluster.gpus_per_node and r.gpus > cluster.gpus_per_node:
        return (f"asks for {r.gpus} GPUs but {cluster.name} nodes have {cluster.gpus_per_node}; "
                "lower model.resources.gpus or use model.quantization=nf4")
    if cluster.cpus_per_node and r.cpus > cluster.cpus_per_node:
        return (f"asks for model.resources.cpus={r.cpus} but {cluster.name} nodes have {cluster.cpus_per_node}; "
                "lower model.resources.cpus")
    if cluster.mem_gb_per_node and r.mem_gb > cluster.mem_gb_per_node:
        return (f"asks for model.resources.mem_gb={r.mem_gb} but {cluster.name} nodes have "
                f"{cluster.mem_gb_per_node} GB; lower model.resources.mem_gb")
    if r.gpus and cluster.cpu_fallback and cell.model.precision == "fp16" and not cell.noop:
        return (f"model.precision=fp16 on {cluster.name}, whose GPUs are declared but not real: the cell "
                "would train on the CPU, where fp16 training is refused; set model.precision=fp32")
    return None
