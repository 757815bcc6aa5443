"""Typed configuration: the dataclasses behind every Hydra config in conf/ and campaigns/.

Hydra composes YAML onto these schemas, so a misspelt field or a wrong type fails at compose time.
``validate_cell`` adds the checks a type cannot express (ranks > 0, a data file that exists, ...)
and is run on every cell before anything is submitted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from aletheia_hpc.evaluation.settings import EvalSettings
from aletheia_hpc.row import TIMING_RECIPE, arm_name

MODEL_KINDS = ("hub", "local", "gguf", "tiny")
PRECISIONS = ("fp32", "bf16", "fp16")
# train.report_to -> the package the Trainer's callback needs
REPORT_TO = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
QUANTIZATIONS = ("none", "nf4", "int8")
# which projections of an adapted layer carry LoRA (aletheia_hpc.method.lora.MODULE_SETS, kept in step by
# tests/test_configs.py; listed here so that plan-time validation needs no torch)
LORA_MODULES = ("all", "attention", "mlp")
TIMINGS = ("sequential", "paired")
LAYER_CHOICES = ("all", "top", "bottom", "random", "last", "middle", "cost_aware")
PROBE_NORMS = ("layer", "tensor_sum")
PROBE_LOSS_TOKENS = ("response", "all")
# transformers' SchedulerType values a cell may use (tests/test_configs.py keeps them in step with
# the installed transformers; listed here so that plan-time validation needs no torch)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


@dataclass
class ResourcesConfig:
    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 64
    time_min: int = 120


@dataclass
class ShapeConfig:
    """Architecture sizes from the model's config.json, for the memory plan (0: unknown, then the plan
    falls back to a rough estimate from ``params``)."""
    hidden_size: int = 0
    intermediate_size: int = 0  # per expert for mixture-of-experts models
    vocab_size: int = 0
    kv_dim: int = 0  # num_key_value_heads x head_dim; 0: as hidden_size (no grouped-query attention)
    gated_mlp: bool = True  # gate/up/down (llama-like) rather than two matrices (GPT-J, GPT-NeoX)
    tied_embeddings: bool = False
    experts: int = 0  # fused experts per layer (MoE); bitsandbytes leaves them unquantized
    experts_per_token: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = MISSING  # a registered family (aletheia_hpc.method.families)
    kind: str = "hub"  # hub | local | gguf | tiny
    # hub: repo id; local: model directory; gguf: a .gguf path or "package:<python package>"; tiny: unused
    path: str = ""
    num_layers: int = MISSING
    params: str = ""  # nominal size, e.g. "7B"
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    paper_name: Optional[str] = None  # the model's name in the paper's tables
    precision: str = "bf16"  # bf16 | fp16 (GPU, loss-scaled) | fp32 (CPU)
    quantization: str = "none"  # none | nf4 (4-bit, double quant, bf16 compute) | int8 (bitsandbytes)
    lr: float = 2e-4
    batch_size: int = 4
    max_seq_len: int = 512
    gradient_checkpointing: bool = False
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class ProbeConfig:
    batches: int = 5
    batch_size: int = 0  # sequences per probe batch; 0: model.batch_size (aletheia-lora uses 1)
    mode: str = "single_pass"  # single_pass | chunked (the paper's 8 layers at a time): same scores
    chunk_size: int = 8
    # layer: || gradient of all the layer's parameters ||_2 per batch, summed over batches;
    # tensor_sum: sum over the layer's parameter tensors of each one's gradient norm (aletheia-lora)
    norm: str = "layer"
    # which tokens the probe's loss covers: the response (as in training) or every token (aletheia-lora)
    loss_tokens: str = "response"


@dataclass
class CostConfig:
    """The step-cost model (aletheia_hpc/method/cost.py), calibrated by timed LoRA steps before a
    selection cell trains, and the speed target of the cost_aware rule."""
    calibration_steps: int = 2  # timed steps per calibration placement; 0: no model, no predicted_speedup
    calibration_warmup: int = 1  # untimed steps before the first timed one
    target_speedup: float = 1.5  # cost_aware: least predicted step-time ratio all-layer LoRA / selection


DROP_GUIDANCE = ("probe", "uniform")  # aletheia_hpc.method.drop_backward.GUIDANCE, listed here without torch


@dataclass
class DropConfig:
    """Backward dropping (aletheia_hpc/method/drop_backward.py): each step detaches sublayers of the
    adapted layers at per-layer rates scaled so that the sublayer step-cost model predicts
    ``target_speedup``; docs/drop_backward.md has the rule."""
    target_speedup: float = 0.0  # 0: no dropping
    rates: str = "probe"  # probe (a low probe score drops more) | uniform
    min_keep: float = 0.1  # least keep probability of any adapted layer
    warmup_steps: int = 0  # optimizer steps at the start that drop nothing


@dataclass
class RecipeConfig:
    name: str = MISSING
    # all (standard LoRA) | a selection strategy: top | bottom | random | last | cost_aware
    layers: str = "all"
    layer_pct: float = 50.0  # layers to adapt (cost_aware: at most this many)
    attention_rank: int = 16
    mlp_rank: int = 64
    modules: str = "all"  # all | attention | mlp: which projections carry adapters (the other rank is unused)
    alpha_factor: float = 2.0
    dropout: float = 0.0
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    drop: DropConfig = field(default_factory=DropConfig)

    @property
    def drops_backward(self) -> bool:
        return self.drop.target_speedup > 0

    @property
    def evaluates_only(self) -> bool:
        """The base-model cell: no adapters, no training."""
        return self.name == "base"

    @property
    def probes(self) -> bool:
        """Whether a cell of this recipe runs the gradient probe (every layer selection does, to
        record the scores; all-layer LoRA and the base cell do not)."""
        return not self.evaluates_only and self.layers != "all"


@dataclass
class TimingArmConfig:
    """One arm of a paired timing cell: its name and the recipe its training cells use."""
    arm: str = MISSING
    recipe: RecipeConfig = MISSING


@dataclass
class PairedTimingConfig:
    """What a paired timing cell (campaign.timing=paired) times: every arm of one model, built as
    the arm's cells of ``seed`` build it, ``warmup`` untimed rounds, then ``rounds`` timed ones."""
    arms: list[TimingArmConfig] = field(default_factory=list)
    rounds: int = 8
    warmup: int = 2


@dataclass
class TrainConfig:
    steps: int = 200
    warmup_steps: int = 20
    grad_accum: int = 2
    lr: Optional[float] = None  # None: the model's lr
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    scheduler: str = "cosine"
    checkpoint_every: int = 50  # optimizer steps between checkpoints (0: only on preemption)
    # held-out loss every this many optimizer steps (and at step 0 and the last), with the training
    # time up to it: the cell's learning curve (row.curve); 0: the final held-out loss only
    eval_every: int = 0
    # experiment tracking of the Trainer's logs, run name = cell id, files in the cell's tracking/
    # directory (wandb offline): none | tensorboard | wandb | mlflow. Not part of the cell's identity.
    report_to: str = "none"


@dataclass
class DataConfig:
    # "builtin" (the project's instruction set), a local .jsonl/.json file, or "hub:<dataset id>"
    source: str = "builtin"
    builtin_size: int = 4000
    template: str = "alpaca"
    eval_size: int = 200  # held-out records, the same for every cell
    split_seed: int = 0


@dataclass
class FaultConfig:
    """Deliberate failures for testing the campaign machinery; never set in a real campaign."""
    raise_on_attempt: int = 0  # raise an exception in this attempt (1 = first); 0 = never
    nan_at_step: int = 0  # make the loss non-finite at this optimizer step; 0 = never
    sleep_per_step_s: float = 0.0


@dataclass
class VariantConfig:
    """One setting of a study. Its cells are (model, recipe, seed) under these settings; each
    (recipe, variant) is an arm, named ``recipe@variant`` (``recipe`` for the matched variant)."""
    name: str = "matched"
    recipes: Optional[list[str]] = None  # None: the campaign's recipes
    models: Optional[list[str]] = None  # None: the campaign's models
    steps: Optional[int] = None  # None: train.steps
    # Hydra overrides of any cell field for this variant's cells, applied after the user's
    # (e.g. ["recipe.layer_pct=25", "train.lr=1e-4"]); model/recipe/seed come from the lists above
    overrides: list[str] = field(default_factory=list)


STAGE_OBJECTIVES = ("eval_loss", "speed_quality")


@dataclass
class FactorConfig:
    """One factor of the staged study's factorial (stage 3): its levels are Hydra overrides of one cell
    field each, applied on top of the winner's settings (e.g. ["train.lr=1e-4", "train.lr=2e-4"])."""
    name: str = MISSING
    levels: list[str] = field(default_factory=list)


@dataclass
class StagesConfig:
    """A staged study (aletheia_hpc/campaign/stages.py): stage 1 is the campaign's own cells (the scan
    arms); stage 2 reruns the ``advance`` best arms by ``objective`` (and the ``baseline`` arm) at
    ``full_steps``; stage 3 is a factorial over ``factors`` on the stage-2 winner, ``factorial_seeds``
    seeds per combination. Each stage is decided from the last one's rows only once it is complete."""
    advance: int = 0  # 0: not a staged study
    objective: str = "eval_loss"  # eval_loss (time breaks ties) | speed_quality (see stages.score)
    loss_decimals: int = 3  # eval_loss: losses equal to this many decimals tie; the faster arm ranks first
    time_weight: float = 0.5  # speed_quality: eval_loss x (time / fastest arm's time) ** time_weight
    baseline: str = "standard"  # the arm rerun in stage 2 beside the top arms: the reference of the report
    full_steps: int = 500
    factors: list[FactorConfig] = field(default_factory=list)
    factorial_seeds: list[int] = field(default_factory=lambda: [42, 123, 999])


@dataclass
class CampaignConfig:
    name: str = "adhoc"
    parts: list[str] = field(default_factory=list)  # a campaign made of other campaigns
    models: list[str] = field(default_factory=list)
    recipes: list[str] = field(default_factory=lambda: ["standard", "aletheia"])
    seeds: list[int] = field(default_factory=lambda: [42, 123, 999])
    variants: list[VariantConfig] = field(default_factory=lambda: [VariantConfig()])
    base_eval: bool = False  # one base-model evaluation cell per model
    # how the speed tables measure each arm: sequential (every cell's own step times, paired with
    # the standard cell of its seed) or paired (also one timing cell per model that times every
    # arm's steps interleaved in one job on one node; the aggregate then uses its ratios)
    timing: str = "sequential"
    timing_steps: int = 8  # paired: timed rounds (one step of every arm each)
    timing_warmup: int = 2  # paired: untimed rounds before them
    noop: bool = False  # cells write a row without loading or training (dispatch benchmarks)
    # cell selector ("model/recipe/seed", "*" wildcards) -> faults for that cell
    faults: dict[str, FaultConfig] = field(default_factory=dict)
    stages: StagesConfig = field(default_factory=StagesConfig)  # advance > 0: a staged study

    @property
    def staged(self) -> bool:
        # any advance but 0: a negative one is a mistake the stage checks name, not a plain campaign
        return self.stages.advance != 0


# sbatch --mail-type values (several may be joined with commas)
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
# options the SLURM dispatcher sets itself: an extra line must not set them again
DISPATCH_OWNED_OPTIONS = ("array", "output", "error", "job-name", "signal", "nodes", "ntasks-per-node",
                          "cpus-per-task", "mem", "time", "gres", "partition", "account", "qos", "requeue",
                          "open-mode", "wckey")


@dataclass
class SbatchConfig:
    """Site options for every job of a SLURM cluster, checked at plan time."""
    constraint: Optional[str] = None  # --constraint, e.g. "a100" or "gpu80g&ib"
    gres_type: Optional[str] = None  # GPU type in --gres=gpu:<type>:<n>, e.g. "a100"
    exclusive: bool = False  # --exclusive: whole nodes (no other job shares the GPUs' host)
    reservation: Optional[str] = None
    mail_type: Optional[str] = None  # e.g. "END,FAIL"
    mail_user: Optional[str] = None
    extra: list[str] = field(default_factory=list)  # further lines, each "--option" or "--option=value"


@dataclass
class ClusterConfig:
    name: str = "local"
    kind: str = "local"  # local | slurm
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # GPUs of one node. SLURM: 0 = unknown (not checked). local: -1 = this machine's visible GPUs,
    # counted when a campaign is planned or launched.
    gpus_per_node: int = 0
    cpus_per_node: int = 0  # SLURM: CPUs of one node, checked at plan time (0: unknown, not checked)
    mem_gb_per_node: int = 0  # SLURM: memory of one node in GB (0: unknown, not checked)
    gpu_mem_gb: int = 0  # memory of one GPU in GiB, for plan's fit check (0: unknown, not checked)
    max_time_min: int = 0  # 0: no limit
    array_parallelism: int = 64  # concurrent tasks per array
    signal_delay_s: int = 90  # pre-timeout warning before the time limit
    max_array_size: int = 0  # 0: read MaxArraySize from scontrol
    setup: list[str] = field(default_factory=list)  # shell lines run before the worker
    local_workers: int = 1
    # A cell that asked for GPUs but finds no CUDA device trains on the CPU instead of failing. Only
    # for clusters whose GPUs are declared but not real (the dev cluster): elsewhere such a cell's
    # timings would not compare with its pair's, so it is refused.
    cpu_fallback: bool = False
    # Compute nodes cannot reach the internet (most academic sites): jobs run with HF_HUB_OFFLINE=1 and
    # HF_DATASETS_OFFLINE=1, and plan/launch refuse a campaign whose inputs `aletheia-hpc prefetch` has not
    # put where the jobs will read them (aletheia_hpc/campaign/preflight.py).
    compute_offline: bool = False
    # The hub cache every job and prefetch use, on the shared file system (HF_HOME; $VARS are expanded
    # where it is used); None: the environment's HF_HOME (or ~/.cache/huggingface).
    hf_home: Optional[str] = None
    # A partition whose nodes reach the internet (a transfer or serial partition): prefetch then runs
    # there as one job instead of on the node it is started on. None: prefetch runs where it is started.
    transfer_partition: Optional[str] = None
    sbatch: SbatchConfig = field(default_factory=SbatchConfig)


@dataclass
class RootConfig:
    model: ModelConfig = MISSING
    recipe: RecipeConfig = MISSING
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    campaign: CampaignConfig = field(default_factory=CampaignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    seed: int = 42
    variant: str = "matched"
    results_dir: str = "results"
    progress: bool = True


@dataclass
class CellConfig:
    """Everything that decides one cell's result; its hash is the cell's identity.

    Where a cell runs (cluster, resources), the shape figures used only for memory planning, and
    deliberate test faults are not part of the identity: moving a campaign to another cluster, or
    resubmitting with a longer time limit, keeps its cells.
    """
    campaign: str
    model: ModelConfig
    recipe: RecipeConfig
    train: TrainConfig
    data: DataConfig
    eval: EvalSettings
    seed: int
    variant: str
    noop: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)
    timing: Optional[PairedTimingConfig] = None  # set only on a paired timing cell

    @property
    def trains(self) -> bool:
        """Whether this cell trains (not a base-model evaluation, not a paired timing cell)."""
        return not self.recipe.evaluates_only and self.timing is None

    @property
    def learning_rate(self) -> float:
        """The one learning-rate rule: train.lr, or the model's lr when it is None."""
        return self.train.lr if self.train.lr is not None else self.model.lr

    @property
    def arm(self) -> str:
        """The arm this cell belongs to: ``recipe`` or ``recipe@variant`` (aletheia_hpc.row.arm_name)."""
        return arm_name(self.recipe.name, self.variant)

    def settings(self) -> dict[str, Any]:
        """What the cell computes, without its labels (variant name): two cells with equal settings
        would produce the same result, so a campaign may not hold both. Recipe fields the cell never
        uses are left out: a variant that sets only those (recipe.layer_pct on standard LoRA) trains
        nothing new."""
        ident = self.identity()
        ident.pop("variant")
        recipe = ident["recipe"]
        if self.recipe.layers == "all":  # every layer: no budget, no probe
            recipe.pop("layer_pct")
            recipe.pop("probe")
        unused_rank = {"attention": "mlp_rank", "mlp": "attention_rank"}.get(self.recipe.modules)
        if unused_rank:
            recipe.pop(unused_rank)
        return ident

    def identity(self) -> dict[str, Any]:
        ident = asdict(self)
        ident.pop("faults")
        if self.timing is None:  # only timing cells have it: every other cell keeps its id
            ident.pop("timing")
        ident["train"].pop("report_to")
        ident["model"].pop("resources")
        ident["model"].pop("shape")
        ident["eval"].pop("sandbox")  # what the node must give, like resources: not the result
        # settings that cannot change this cell's result stay out, so that adding such a field keeps
        # every earlier cell's id (and its finished row): the cost model only times steps and restores
        # the model unless it chooses the layers; a benchmark's settings matter only when it runs
        if self.recipe.layers != "cost_aware" and not self.recipe.drops_backward:
            ident["recipe"].pop("cost")
        if not self.recipe.drops_backward:  # fields added later stay out at their defaults
            ident["recipe"].pop("drop")
        if not self.train.eval_every:
            ident["train"].pop("eval_every")
        if self.recipe.modules == "all":  # the default, as before the field existed
            ident["recipe"].pop("modules")
        if "task" not in self.eval.benchmarks:
            for name in ("task_n", "task_max_new_tokens"):
                ident["eval"].pop(name)
        return ident

    @property
    def cell_id(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CellConfig":
        typed = OmegaConf.merge(OmegaConf.structured(CellConfig), data)
        return OmegaConf.to_object(typed)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def validate_cell(cell: CellConfig) -> None:
    """Raise ConfigError listing every problem of one cell (nothing is submitted if any)."""
    from aletheia_hpc.data.builtin import BUILTIN_NAME
    from aletheia_hpc.data.instructions import TEMPLATES
    from aletheia_hpc.evaluation.settings import validate as validate_eval
    from aletheia_hpc.method.families import UnknownFamily, get_family

    problems = []
    m, r, t = cell.model, cell.recipe, cell.train
    try:
        get_family(m.family)
    except UnknownFamily as exc:
        problems.append(f"model.family: {exc}")
    if m.kind not in MODEL_KINDS:
        problems.append(f"model.kind={m.kind!r}: use one of {MODEL_KINDS}")
    if m.kind in ("hub", "local", "gguf") and not m.path:
        problems.append(f"model.path is empty: a {m.kind} model needs a path")
    if m.kind == "local" and m.path and not Path(m.path).is_dir():
        problems.append(f"model.path={m.path!r}: no such model directory")
    if m.precision not in PRECISIONS:
        problems.append(f"model.precision={m.precision!r}: use one of {PRECISIONS}")
    if m.quantization not in QUANTIZATIONS:
        problems.append(f"model.quantization={m.quantization!r}: use one of {QUANTIZATIONS}")
    if m.precision == "fp16" and m.resources.gpus == 0:
        problems.append("model.precision=fp16 with model.resources.gpus=0: fp16 training needs a GPU; "
                        "set model.precision=fp32 for a CPU cell")
    if m.resources.gpus < 0:
        problems.append(f"model.resources.gpus={m.resources.gpus}: must be >= 0")
    for name in ("num_layers", "batch_size", "max_seq_len"):
        if getattr(m, name) <= 0:
            problems.append(f"model.{name}={getattr(m, name)}: must be > 0")
    if r.layers not in LAYER_CHOICES:
        problems.append(f"recipe.layers={r.layers!r}: use one of {LAYER_CHOICES}")
    for name in ("attention_rank", "mlp_rank"):
        if getattr(r, name) <= 0:
            problems.append(f"recipe.{name}={getattr(r, name)}: LoRA ranks must be positive integers")
    if r.modules not in LORA_MODULES:
        problems.append(f"recipe.modules={r.modules!r}: use one of {LORA_MODULES}")
    if not 0 < r.layer_pct <= 100:
        problems.append(f"recipe.layer_pct={r.layer_pct}: top-k percentage must be in (0, 100]")
    if r.probe.mode not in ("single_pass", "chunked"):
        problems.append(f"recipe.probe.mode={r.probe.mode!r}: use single_pass or chunked")
    if r.probe.batches <= 0 or r.probe.chunk_size <= 0:
        problems.append("recipe.probe.batches and recipe.probe.chunk_size must be > 0")
    if r.probe.batch_size < 0:
        problems.append(f"recipe.probe.batch_size={r.probe.batch_size}: use 0 (model.batch_size) or a "
                        "positive number of sequences")
    if r.probe.norm not in PROBE_NORMS:
        problems.append(f"recipe.probe.norm={r.probe.norm!r}: use one of {PROBE_NORMS}")
    if r.probe.loss_tokens not in PROBE_LOSS_TOKENS:
        problems.append(f"recipe.probe.loss_tokens={r.probe.loss_tokens!r}: use one of {PROBE_LOSS_TOKENS}")
    c = r.cost
    if c.calibration_steps < 0 or c.calibration_warmup < 0:
        problems.append(f"recipe.cost.calibration_steps={c.calibration_steps}, recipe.cost.calibration_warmup="
                        f"{c.calibration_warmup}: must be >= 0 (calibration_steps=0: no step-cost model)")
    if r.probes and c.calibration_steps > 0 and m.num_layers == 1:
        problems.append("model.num_layers=1: the step-cost model needs at least 2 layers; set "
                        "recipe.cost.calibration_steps=0")
    if r.layers == "cost_aware":
        if c.calibration_steps == 0:
            problems.append("recipe.cost.calibration_steps=0 with recipe.layers=cost_aware: the rule needs "
                            "a calibrated step-cost model; set recipe.cost.calibration_steps >= 1")
        if not c.target_speedup >= 1.0:
            problems.append(f"recipe.cost.target_speedup={c.target_speedup}: must be >= 1.0 (the predicted "
                            "step-time ratio of all-layer LoRA to the selection; 1.0 gives aletheia's choice)")
    dr = r.drop
    if r.drops_backward:
        if not r.probes or c.calibration_steps == 0:
            problems.append("recipe.drop.target_speedup > 0 needs the probe and a calibrated step-cost model: set "
                            "recipe.layers to a selection (top with layer_pct=100 adapts every layer) and "
                            "recipe.cost.calibration_steps >= 1")
        if dr.target_speedup < 1.0:
            problems.append(f"recipe.drop.target_speedup={dr.target_speedup}: use 0 (no dropping) or >= 1.0")
        if dr.rates not in DROP_GUIDANCE:
            problems.append(f"recipe.drop.rates={dr.rates!r}: use one of {DROP_GUIDANCE}")
        if not 0 < dr.min_keep <= 1:
            problems.append(f"recipe.drop.min_keep={dr.min_keep}: must be in (0, 1]")
        if dr.warmup_steps < 0:
            problems.append(f"recipe.drop.warmup_steps={dr.warmup_steps}: must be >= 0")
    elif dr.target_speedup < 0:
        problems.append(f"recipe.drop.target_speedup={dr.target_speedup}: use 0 (no dropping) or >= 1.0")
    if t.eval_every < 0:
        problems.append(f"train.eval_every={t.eval_every}: use 0 (final held-out loss only) or a positive "
                        "number of optimizer steps")
    if t.steps <= 0:
        problems.append(f"train.steps={t.steps}: must be > 0")
    if t.grad_accum <= 0:
        problems.append(f"train.grad_accum={t.grad_accum}: must be > 0")
    if t.warmup_steps < 0:
        problems.append(f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    if cell.learning_rate <= 0:
        problems.append("train.lr (or model.lr): must be > 0")
    if t.scheduler not in SCHEDULERS:
        problems.append(f"train.scheduler={t.scheduler!r}: use one of {SCHEDULERS}")
    if t.report_to not in REPORT_TO:
        problems.append(f"train.report_to={t.report_to!r}: use one of {tuple(REPORT_TO)}")
    elif REPORT_TO[t.report_to] and importlib.util.find_spec(REPORT_TO[t.report_to]) is None:
        problems.append(f"train.report_to={t.report_to}: the {REPORT_TO[t.report_to]} package is not installed; "
                        f"pip install {REPORT_TO[t.report_to]}")
    if t.checkpoint_every < 0:
        problems.append(f"train.checkpoint_every={t.checkpoint_every}: use 0 (only on preemption) or a "
                        "positive number of optimizer steps")
    d = cell.data
    if d.source != BUILTIN_NAME and not d.source.startswith("hub:") and not Path(d.source).is_file():
        problems.append(f"data.source={d.source!r}: no such file; give an Alpaca-format .jsonl/.json "
                        "file, 'builtin', or 'hub:<dataset id>'")
    if d.template not in TEMPLATES:
        problems.append(f"data.template={d.template!r}: use one of {sorted(TEMPLATES)}")
    if d.eval_size <= 0:
        problems.append(f"data.eval_size={d.eval_size}: must be > 0")
    if d.source == BUILTIN_NAME and d.eval_size >= d.builtin_size:
        problems.append(f"data.eval_size={d.eval_size} with data.builtin_size={d.builtin_size}: the held-out "
                        "split would leave no training records; raise data.builtin_size or lower data.eval_size")
    try:
        validate_eval(cell.eval)
    except ValueError as exc:
        problems.append(f"eval: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))


def validate_cluster(cluster: ClusterConfig) -> None:
    """Raise ConfigError listing every problem of the cluster profile's sbatch options."""
    import re

    sb, problems = cluster.sbatch, []
    token = re.compile(r"^[A-Za-z0-9_.:,&|\[\]*+-]+$")
    for name in ("constraint", "gres_type", "reservation"):
        value = getattr(sb, name)
        if value is not None and not token.match(value):
            problems.append(f"cluster.sbatch.{name}={value!r}: no spaces, quotes or newlines")
    if sb.gres_type is not None and ":" in sb.gres_type:
        problems.append(f"cluster.sbatch.gres_type={sb.gres_type!r}: the type only (e.g. a100); the count comes "
                        "from model.resources.gpus")
    if sb.mail_type is not None:
        bad = [t for t in sb.mail_type.split(",") if t.strip().upper() not in MAIL_TYPES]
        if bad:
            problems.append(f"cluster.sbatch.mail_type={sb.mail_type!r}: {', '.join(bad)} not one of {MAIL_TYPES}")
        if not sb.mail_user:
            problems.append("cluster.sbatch.mail_type is set but cluster.sbatch.mail_user is not: where to send it?")
    if sb.mail_user is not None and not re.match(r"^[^\s@]+(@[^\s@]+)?$", sb.mail_user):
        problems.append(f"cluster.sbatch.mail_user={sb.mail_user!r}: one user name or address")
    for line in sb.extra:
        option = line.removeprefix("#SBATCH").strip()
        name = option[2:].split("=", 1)[0]
        if not option.startswith("--") or not name or "\n" in line or " " in option.split("=", 1)[0]:
            problems.append(f"cluster.sbatch.extra: {line!r}: write one long option, '--name' or '--name=value'")
        elif name in DISPATCH_OWNED_OPTIONS:
            problems.append(f"cluster.sbatch.extra: {line!r}: --{name} is set by the dispatcher "
                            "(use model.resources or the cluster profile's own field)")
    if cluster.transfer_partition is not None:
        if cluster.kind != "slurm":
            problems.append(f"cluster.transfer_partition={cluster.transfer_partition!r} on cluster {cluster.name!r} of "
                            f"kind {cluster.kind}: only a SLURM cluster has partitions; unset it to prefetch here")
        elif not token.match(cluster.transfer_partition):
            problems.append(f"cluster.transfer_partition={cluster.transfer_partition!r}: one partition name, "
                            "no spaces or quotes")
    if cluster.hf_home is not None and (not cluster.hf_home.strip() or "\n" in cluster.hf_home
                                        or any(q in cluster.hf_home for q in "'\"`")):
        problems.append(f"cluster.hf_home={cluster.hf_home!r}: one directory path (may use $VARS), no quotes")
    if cluster.kind != "slurm" and (sb != SbatchConfig()):
        problems.append(f"cluster.sbatch is set on cluster {cluster.name!r} of kind {cluster.kind}: only SLURM "
                        "jobs take sbatch options")
    if problems:
        raise ConfigError("; ".join(problems))


def sbatch_extra_parameters(sbatch: SbatchConfig) -> dict[str, Any]:
    """cluster.sbatch.extra as submitit additional_parameters ('--hint=nomultithread' -> hint)."""
    out: dict[str, Any] = {}
    for line in sbatch.extra:
        name, sep, value = line.removeprefix("#SBATCH").strip()[2:].partition("=")
        out[name.replace("-", "_")] = value if sep else True
    return out


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
