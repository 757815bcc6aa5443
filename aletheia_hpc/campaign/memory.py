"""Peak GPU memory of a cell, estimated from its config before anything is submitted.

The estimate is the largest of the load peak, the probe's peak and the training peak, each the sum of

weights      parameters x bytes per weight. Quantized cells (nf4: 4 bits plus double-quantized
             absmax, int8: 1 byte) store the layers' linear weights that way, MoE experts included
             once split into one Linear per expert (models/experts_layout.py says which form they
             take: ``MemoryEstimate.experts``); embeddings and LM head stay in the model's precision.
adapters     LoRA parameters of the adapted layers (ranks as in the recipe; per expert for fused
             MoE experts) x 16 bytes: fp32 weight, gradient and two AdamW moments. Training only.
activations  what backward keeps per token and layer, ACTIVATION_BYTES x (hidden + active
             intermediate size) at 16 bits (twice that for fp32), for every layer backward runs
             through; with activation checkpointing only each layer's input plus one layer's worth.
             The probe runs without checkpointing through every layer.
logits       LOGIT_BYTES per token and vocabulary entry (16-bit logits, their fp32 copy in the loss
             and its gradient).

Loading (MoE only): a quantized load materialises the fused experts in the model's precision
before splitting and quantizing them, so the load peaks at the weights with 16-bit experts.

for ``batch_size x max_seq_len`` tokens (a batch padded to the longest sequence is never longer).
Which layers a probe-selected recipe adapts is not known before the probe runs, so backward is
taken to reach layer 0 (the worst case) for every recipe but ``last``. A cell over several GPUs is
split evenly (accelerate's balanced device map).

A paired timing cell (campaign.timing=paired) holds one copy of the model and its adapters per arm
at once; it is counted so: weights and all-layer adapters times the number of arms, activations of
one step (the arms step one at a time).

The two coefficients are fitted to bench/results/gpu_speed_h100.txt (Qwen2.5-0.5B and -7B, bf16
autocast and 4-bit NF4, batch 4 x 512, no checkpointing; peaks from torch.cuda.max_memory_allocated):
the estimates are 0.99x to 1.16x of the twelve measured peaks (tests/test_memory_plan.py).
Reserved-but-unused allocator memory and the CUDA context are not in that figure: the fit check
keeps FIT_MARGIN of each GPU free for them.

Orchestration only: no torch here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from aletheia_hpc.config import CellConfig, ClusterConfig, ModelConfig, ShapeConfig
from aletheia_hpc.method.selection import layer_budget
from aletheia_hpc.models.experts_layout import PER_EXPERT, experts_layout, planned_experts_label

GIB = 2**30
ACTIVATION_BYTES = 11.0  # per token, layer and unit of (hidden + intermediate), 16-bit activations
LOGIT_BYTES = 12.0
ADAPTER_BYTES = 16  # fp32 LoRA weight + gradient + AdamW exp_avg + exp_avg_sq
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZED_BYTES = {"nf4": 4.127 / 8, "int8": 1.0}  # nf4: 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks
FIT_MARGIN = 0.10
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*$", re.IGNORECASE)
_SCALE = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    adapters_gib: float  # 0 when the probe peaks
    activations_gib: float  # of the phase that peaks
    logits_gib: float
    probe_gib: float
    train_gib: float
    gpus: int
    rough: bool  # sizes guessed from the nominal parameter count (model.shape not given)
    load_gib: float = 0.0  # weights while loading, fused experts not yet split (0: no MoE split)
    experts: str | None = None  # the experts' form once loaded (``per-expert nf4``), None without

    @property
    def peak_gib(self) -> float:
        return max(self.load_gib, self.probe_gib, self.train_gib)

    @property
    def peak_phase(self) -> str:
        phases = {"train": self.train_gib, "probe": self.probe_gib, "load": self.load_gib}
        return max(phases, key=phases.get)

    @property
    def per_gpu_gib(self) -> float:
        return self.peak_gib / max(self.gpus, 1)


def nominal_params(text: str) -> float | None:
    """'7B' -> 7e9, '135M' -> 1.35e8; None when the string is no size (e.g. 'tiny')."""
    match = _SIZE.match(text or "")
    return float(match.group(1)) * _SCALE[match.group(2).upper()] if match else None


def _shape(model: ModelConfig) -> tuple[ShapeConfig, bool] | None:
    """The model's shape, or one guessed from its nominal size (rough=True), or None if neither."""
    s = model.shape
    if s.hidden_size and s.intermediate_size and s.vocab_size:
        return s, False
    params = nominal_params(model.params)
    if params is None:
        return None
    # A llama-like layer holds ~12 h^2 parameters (4 h^2 attention, 3 x 2.7 h x h MLP).
    hidden = int(math.sqrt(params / (12 * model.num_layers)))
    return ShapeConfig(hidden_size=hidden, intermediate_size=int(2.7 * hidden), vocab_size=32000), True


def _layer_sizes(s: ShapeConfig) -> tuple[int, int, int]:
    """(attention, MLP, expert) weight parameters of one layer; expert parameters are fused tensors."""
    h, i, kv = s.hidden_size, s.intermediate_size, s.kv_dim or s.hidden_size
    attention = 2 * h * h + 2 * h * kv
    mlp = (3 if s.gated_mlp else 2) * h * i
    return (attention, 0, mlp * s.experts) if s.experts else (attention, mlp, 0)


def adapter_params(s: ShapeConfig, layers: int, attention_rank: int, mlp_rank: int, modules: str = "all") -> int:
    """LoRA parameters on ``layers`` layers: rank x (in + out) per adapted matrix, llama-style names
    (q, k, v, o; gate, up, down), on the ``modules`` set (all | attention | mlp). Fused experts carry one
    rank-r adapter per expert on gate_up and down."""
    h, i, kv = s.hidden_size, s.intermediate_size, s.kv_dim or s.hidden_size
    attention = attention_rank * (2 * h + 2 * (h + kv) + 2 * h)
    if s.experts:
        mlp = mlp_rank * s.experts * ((h + 2 * i) + (i + h))
    else:
        mlp = mlp_rank * ((3 if s.gated_mlp else 2) * (h + i))
    return layers * ((attention if modules != "mlp" else 0) + (mlp if modules != "attention" else 0))


def estimate_cell(cell: CellConfig) -> MemoryEstimate | None:
    """Peak GPU memory of ``cell`` (see the module docstring), or None for a model of unknown size."""
    m, r = cell.model, cell.recipe
    found = _shape(m)
    if found is None:
        return None
    s, rough = found
    L = m.num_layers
    attention, mlp, experts = _layer_sizes(s)
    embeddings = s.vocab_size * s.hidden_size * (1 if s.tied_embeddings else 2)
    full = PRECISION_BYTES[m.precision]
    linear = QUANTIZED_BYTES.get(m.quantization, full)
    split = bool(experts) and experts_layout(m.quantization) == PER_EXPERT
    weights = L * ((attention + mlp) * linear + experts * (linear if split else full)) + embeddings * full
    load = L * ((attention + mlp) * linear + experts * full) + embeddings * full if split else 0.0

    tokens = m.batch_size * m.max_seq_len
    active_intermediate = s.intermediate_size * max(s.experts_per_token, 1)
    per_layer = tokens * ACTIVATION_BYTES * (full / 2) * (s.hidden_size + active_intermediate)
    logits = tokens * s.vocab_size * LOGIT_BYTES
    probe = weights + L * per_layer + logits if r.probes else 0.0

    if r.evaluates_only:  # one layer's forward at a time
        adapters, activations = 0.0, per_layer
    else:
        adapted = L if r.layers == "all" else layer_budget(L, r.layer_pct)
        adapters = adapter_params(s, adapted, r.attention_rank, r.mlp_rank, r.modules) * ADAPTER_BYTES
        depth = adapted if r.layers == "last" else L  # layers backward runs through
        if m.gradient_checkpointing:
            activations = depth * tokens * s.hidden_size * full + per_layer
        else:
            activations = depth * per_layer
    if cell.timing is not None:  # one loaded copy per arm; at most all layers' adapters each
        arms = [a.recipe for a in cell.timing.arms]
        weights *= len(arms)
        if split:  # the arms loaded before the last one stay in memory while it loads
            load += weights * (len(arms) - 1) / len(arms)
        adapters = len(arms) * ADAPTER_BYTES * adapter_params(s, L, max(a.attention_rank for a in arms),
                                                              max(a.mlp_rank for a in arms))
        probe = weights + L * per_layer + logits if any(a.probes for a in arms) else 0.0
    train = weights + adapters + activations + logits
    probe_peaks = probe > train
    return MemoryEstimate(weights_gib=weights / GIB, adapters_gib=0.0 if probe_peaks else adapters / GIB,
                          activations_gib=(L * per_layer if probe_peaks else activations) / GIB,
                          logits_gib=logits / GIB, probe_gib=probe / GIB, train_gib=train / GIB,
                          gpus=m.resources.gpus, rough=rough, load_gib=load / GIB,
                          experts=planned_experts_label(m.quantization, m.precision) if experts else None)


def fit_problem(cell: CellConfig, estimate: MemoryEstimate | None, cluster: ClusterConfig) -> str | None:
    """Why ``cell`` will not fit its GPUs' memory on ``cluster`` (and what to change), or None."""
    gpus = cell.model.resources.gpus
    if gpus == 0 or estimate is None or not cluster.gpu_mem_gb:
        return None
    usable = cluster.gpu_mem_gb * (1 - FIT_MARGIN)
    if estimate.per_gpu_gib <= usable:
        return None
    e = estimate
    if e.peak_phase == "load":
        weights = f"weights {e.load_gib:.1f} before the experts are split into {e.experts}"
    else:
        weights = f"weights {e.weights_gib:.1f}" + (f", experts {e.experts}" if e.experts else "")
    return (f"estimated peak {e.per_gpu_gib:.1f} GiB per GPU ({e.peak_phase}: {weights}, "
            f"adapters {e.adapters_gib:.1f}, activations {e.activations_gib:.1f}, logits {e.logits_gib:.1f} "
            f"GiB over {gpus} GPU(s)) exceeds {usable:.1f} of {cluster.name}'s {cluster.gpu_mem_gb} GiB per "
            "GPU; raise model.resources.gpus, set model.quantization=nf4, turn on "
            "model.gradient_checkpointing, or lower model.batch_size")
