"""Standard vs selective LoRA on a GPU: time per optimizer step and peak memory, real-size models.

Models are built from the public config.json values of Qwen2.5-0.5B and Qwen2.5-7B (written out
below) with random initial weights, so nothing is downloaded. For each model and precision (bf16,
and 4-bit NF4 through bitsandbytes) three arms are timed one after the other on the same weights:

  standard           LoRA on every layer
  aletheia           LoRA on the top 50% of layers by the gradient probe
  cost_aware         the probe's scores and a step-cost model calibrated on this model, precision
                     and GPU (method/cost.py): the best score mass predicted >= --target-speedup x
                     faster than standard, at aletheia's budget (README, "the cost_aware recipe")
  top-half-by-depth  LoRA on the half of the layers nearest the output (no probe)

Every arm's predicted speedup (the calibrated model, T(all) / T(S)) is printed beside the measured
ratio. Calibration times single micro-batch AdamW steps of three placements on the probe batches,
without autocast, so it predicts ratios, not the seconds of an accumulated autocast step. The 4-bit
section calibrates again on the 4-bit model (its step costs differ) and picks its cost_aware set
with those costs and the bf16 probe's scores.

LoRA ranks are 16 (attention) / 64 (MLP), alpha = 2 x rank, dropout 0, as in the project. A step is
``--accum`` micro-batches of ``--batch-size`` x ``--seq`` random tokens, forward and backward under
bf16 autocast (as the project's HF Trainer runs with bf16=True), gradient clipping at 1.0 and fused
AdamW on the trainable parameters; the device is synchronized around each step. Peak memory is
torch.cuda.max_memory_allocated over an arm's warm-up and timed steps (reset between arms), so it
includes the frozen weights.

4-bit: the random bf16 model is saved with save_pretrained to a temporary folder and loaded back
with BitsAndBytesConfig(nf4, double quant, bf16 compute), i.e. the same random weights, quantized.
The plain probe refuses quantized weights (QuantizedProbeError, shown in the output), so the 4-bit
arms use the layers the bf16 probe chose on the same weights. prepare_model_for_kbit_training is
NOT used: it turns on input gradients, which would force backward through every layer.

On random-init models the probe tends to pick low layers (gradients are larger near the input of a
random net), which limits how much backward a selective arm saves; the top-half-by-depth arm shows
the saving when the adapted layers are the top ones.

    PYTHONPATH=. python bench/gpu_speed.py                          # both models, bf16 and 4-bit
    PYTHONPATH=. python bench/gpu_speed.py --models qwen2.5-0.5b --precisions bf16 --steps 3
    PYTHONPATH=. python bench/gpu_speed.py --models tiny --device cpu --precisions bf16  # no GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from aletheia_hpc.method import (InfeasibleSpeedup, LoraRanks, QuantizedProbeError, apply_lora,
                                 calibrate_step_cost, enable_selective_checkpointing, family_of, probe_layer_scores,
                                 select_cost_aware, select_layers)

# From the models' public config.json files (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-7B).
MODEL_CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         use_sliding_window=False, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       use_sliding_window=False, bos_token_id=151643, eos_token_id=151643),
    # For checking the script without a GPU; not a measurement.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024, rope_theta=10000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
}
ARMS = ("standard", "aletheia", "cost_aware", "top-half-by-depth")
RANKS = LoraRanks(attention=16, mlp=64)


@dataclass
class ArmResult:
    model: str
    precision: str
    arm: str
    layers: list[int]
    predicted_speedup: float = float("nan")  # the section's calibrated step-cost model, vs standard
    trainable_params: int = 0
    step_times_s: list[float] = field(default_factory=list)
    median_s: float = float("nan")
    weights_gib: float = float("nan")  # memory allocated before the arm's first step
    peak_gib: float = float("nan")
    final_loss: float = float("nan")
    error: str = ""


@dataclass
class SectionInfo:
    model: str
    precision: str
    layers: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)  # StepCostModel.to_dict() of this section's calibration
    predicted: dict = field(default_factory=dict)  # arm -> predicted speedup vs standard
    probe_s: float = float("nan")
    scores: list[float] = field(default_factory=list)
    selection_source: str = ""
    build_s: float = float("nan")
    note: str = ""
    skipped: str = ""


def log(msg: str) -> None:
    print(msg, flush=True)


class Report:
    """Everything measured so far; the table is rewritten to ``path`` after every arm, so a run cut
    off by a time limit still leaves its figures."""

    def __init__(self, args, header: str) -> None:
        self.args, self.header = args, header
        self.results: list[ArmResult] = []
        self.sections: list[SectionInfo] = []

    def table(self) -> str:
        return table(self.results, self.sections, self.args, self.header)

    def save(self) -> None:
        if self.args.table_file:
            with open(self.args.table_file, "w") as fh:
                fh.write(self.table() + "\n")
        if self.args.json:
            with open(self.args.json, "w") as fh:
                json.dump({"header": self.header, "args": {k: str(v) for k, v in vars(self.args).items()},
                           "results": [asdict(r) for r in self.results],
                           "sections": [asdict(s) for s in self.sections]}, fh, indent=1)


def gib(n: float) -> float:
    return n / 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_bf16(name: str, device: torch.device, seed: int) -> torch.nn.Module:
    config = Qwen2Config(**MODEL_CONFIGS[name])
    torch.manual_seed(seed)
    with torch.device(device):  # initialise directly on the GPU: 7B on the CPU would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def load_4bit(folder: str, device: torch.device) -> torch.nn.Module:
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map=device_map, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def make_batches(n: int, vocab: int, batch_size: int, seq: int, device: torch.device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq), generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def run_arm(base, family, res: ArmResult, micro: list[dict], args, device: torch.device, deadline: float):
    """Adapt ``base`` on res.layers, time warm-up + timed steps, then unload; returns the bare base."""
    model = apply_lora(base, family, res.layers, RANKS)
    try:
        if args.checkpointing:
            enable_selective_checkpointing(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        res.trainable_params = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        free_memory(device)
        if device.type == "cuda":
            res.weights_gib = gib(torch.cuda.memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast)
        k = 0
        for step in range(args.warmup + args.steps):
            timed = step >= args.warmup
            if timed and len(res.step_times_s) >= args.min_steps and time.monotonic() > deadline:
                log(f"    deadline reached: stopping {res.arm} after {len(res.step_times_s)} timed steps")
                break
            sync(device)
            t0 = time.perf_counter()
            total = 0.0
            for _ in range(args.accum):
                with autocast:
                    loss = model(**micro[k % len(micro)]).loss / args.accum
                k += 1
                loss.backward()
                total += loss.detach()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if timed:
                res.step_times_s.append(time.perf_counter() - t0)
        res.final_loss = float(total)
        if device.type == "cuda":
            res.peak_gib = gib(torch.cuda.max_memory_allocated(device))
        res.median_s = statistics.median(res.step_times_s) if res.step_times_s else float("nan")
        del opt, params
    finally:
        if args.checkpointing:
            model.get_base_model().gradient_checkpointing_disable()
        base = model.unload()
        del model
        free_memory(device)
    return base


def calibrate(base, family, info: SectionInfo, scores, probe_batches, args, device) -> None:
    """Fit this section's step-cost model, choose its cost_aware set and predict every arm's speedup."""
    sync(device)
    cost = calibrate_step_cost(base, probe_batches, RANKS, family=family, max_grad_norm=args.max_grad_norm)
    info.cost = cost.to_dict()
    try:
        info.layers["cost_aware"] = select_cost_aware(scores, cost, args.target_speedup, 50)
    except InfeasibleSpeedup as exc:
        info.layers.pop("cost_aware", None)
        info.note = (info.note + "; " if info.note else "") + f"cost_aware not run: {exc}"
    info.predicted = {arm: cost.speedup(layers) for arm, layers in info.layers.items()}
    log(f"  [{info.model} {info.precision}] step cost: fixed {cost.fixed_s:.4f}s, backward/layer "
        f"{cost.backward_layer_s:.5f}s, adapters/layer {cost.adapter_layer_s:.5f}s (calibration "
        f"{cost.calibration_s:.1f}s); cost_aware layers {info.layers.get('cost_aware')}")


def time_arms(base, family, info: SectionInfo, micro, args, device, deadline, report: Report):
    for arm in ARMS:
        if arm not in info.layers:
            continue
        res = ArmResult(info.model, info.precision, arm, info.layers[arm],
                        predicted_speedup=info.predicted.get(arm, float("nan")))
        try:
            base = run_arm(base, family, res, micro, args, device, deadline)
        except Exception as exc:  # keep the other arms' figures
            res.error = f"{type(exc).__name__}: {exc}"[:300]
            free_memory(device)
        report.results.append(res)
        report.save()
        log(f"  [{info.model} {info.precision}] {arm:18s} median {res.median_s:.4f}s over "
            f"{len(res.step_times_s)} steps, peak {res.peak_gib:.2f} GiB, trainable {res.trainable_params:,}, "
            f"loss {res.final_loss:.3f} {res.error}")
    return base


def bench_model(name: str, args, device, t_start: float, report: Report):
    cfg = MODEL_CONFIGS[name]
    L = cfg["num_hidden_layers"]
    half = L // 2
    precisions = args.precisions
    deadline = t_start + args.deadline_s

    info = SectionInfo(name, "bf16")
    report.sections.append(info)
    t0 = time.perf_counter()
    base = build_bf16(name, device, args.seed)
    sync(device)
    info.build_s = time.perf_counter() - t0
    family = family_of(base)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"\n== {name}: {n_params / 1e9:.3f}B parameters, {L} layers, built in {info.build_s:.1f}s ==")
    micro = make_batches(args.accum * 2, cfg["vocab_size"], args.batch_size, args.seq, device, args.seed + 1)
    probe_batches = make_batches(args.probe_batches, cfg["vocab_size"], args.batch_size, args.seq, device,
                                 args.seed + 2)
    sync(device)
    t0 = time.perf_counter()
    scores = probe_layer_scores(base, probe_batches)
    sync(device)
    info.probe_s = time.perf_counter() - t0
    info.scores = scores
    info.layers = {"standard": list(range(L)), "aletheia": select_layers(scores, 50),
                   "top-half-by-depth": list(range(L - half, L))}
    info.selection_source = "bf16 probe"
    log(f"  probe ({args.probe_batches} batches of {args.batch_size}x{args.seq}): {info.probe_s:.2f}s; "
        f"aletheia layers {info.layers['aletheia']}")
    log("  scores: " + " ".join(f"{s:.3g}" for s in scores))
    calibrate(base, family, info, scores, probe_batches, args, device)

    if "bf16" in precisions:
        if time.monotonic() > deadline:
            info.skipped = "deadline"
        else:
            base = time_arms(base, family, info, micro, args, device, deadline, report)
    else:
        info.skipped = "not requested"

    if "nf4" not in precisions:
        del base
        free_memory(device)
        return
    qinfo = SectionInfo(name, "nf4", layers={a: info.layers[a] for a in info.layers if a != "cost_aware"},
                        probe_s=float("nan"),
                        selection_source="bf16 probe of the same random-init weights (same seed)")
    report.sections.append(qinfo)
    if time.monotonic() > deadline:
        qinfo.skipped = "deadline"
        del base
        free_memory(device)
        return
    tmp_root = args.tmpdir
    if tmp_root is None:
        need = 2.2 * n_params  # bytes of a bf16 checkpoint, with margin
        tmp_root = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need else None
    folder = tempfile.mkdtemp(prefix="gpu_speed_", dir=tmp_root)
    try:
        t0 = time.perf_counter()
        base.save_pretrained(folder)
        del base
        free_memory(device)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        qbase = load_4bit(folder, device)
        sync(device)
        qinfo.build_s = time.perf_counter() - t0
        log(f"\n== {name} 4-bit NF4: saved bf16 in {t_save:.1f}s to {folder}, loaded 4-bit in {qinfo.build_s:.1f}s ==")
    except Exception as exc:
        qinfo.skipped = f"4-bit load failed: {type(exc).__name__}: {exc}"[:400]
        log("  " + qinfo.skipped)
        free_memory(device)
        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        probe_layer_scores(qbase, probe_batches[:1])
        qinfo.note = "plain probe did NOT refuse the 4-bit model (unexpected)"
    except QuantizedProbeError as exc:
        qinfo.note = f"plain probe on 4-bit refused as designed: QuantizedProbeError: {str(exc)[:110]}..."
    log("  " + qinfo.note)
    calibrate(qbase, family, qinfo, scores, probe_batches, args, device)
    time_arms(qbase, family, qinfo, micro, args, device, deadline, report)
    del qbase
    free_memory(device)


def versions(device: torch.device) -> str:
    import peft
    import transformers

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"transformers {transformers.__version__}",
             f"peft {peft.__version__}"]
    try:
        import bitsandbytes

        parts.append(f"bitsandbytes {bitsandbytes.__version__}")
    except Exception as exc:  # noqa: BLE001
        parts.append(f"bitsandbytes missing ({type(exc).__name__})")
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        parts.append(f"device {device}")
    return ", ".join(parts)


def table(results: list[ArmResult], sections: list[SectionInfo], args, header: str) -> str:
    lines = [header,
             f"batch {args.batch_size}x{args.seq}, grad accumulation {args.accum}, LoRA ranks attn {RANKS.attention} / "
             f"MLP {RANKS.mlp}, fused AdamW, clip {args.max_grad_norm}, bf16 autocast {'on' if args.autocast else 'off'}, "
             f"activation checkpointing {'on (non-reentrant, no input grads)' if args.checkpointing else 'off'}, "
             f"{args.warmup} warm-up + up to {args.steps} timed steps, median; random-init weights, seed {args.seed}",
             "",
             f"{'model':13s} {'prec':5s} {'arm':18s} {'#L':>3s} {'trainable':>11s} {'median s':>9s} "
             f"{'std/arm':>8s} {'predicted':>9s} {'peak GiB':>9s} {'steps':>5s}"]
    for info in sections:
        rows = [r for r in results if r.model == info.model and r.precision == info.precision]
        if not rows:
            lines.append(f"{info.model:13s} {info.precision:5s} skipped: {info.skipped or 'no results'}")
            continue
        std = next((r.median_s for r in rows if r.arm == "standard"), float("nan"))
        for r in rows:
            ratio = std / r.median_s if r.median_s == r.median_s and r.median_s > 0 else float("nan")
            lines.append(f"{r.model:13s} {r.precision:5s} {r.arm:18s} {len(r.layers):3d} {r.trainable_params:11,d} "
                         f"{r.median_s:9.4f} {ratio:7.3f}x {r.predicted_speedup:8.3f}x {r.peak_gib:9.2f} "
                         f"{len(r.step_times_s):5d}"
                         + (f"  ERROR {r.error}" if r.error else ""))
    lines.append("")
    for info in sections:
        if not info.layers:
            continue
        src = info.selection_source
        probe = f"probe {info.probe_s:.2f}s, " if info.probe_s == info.probe_s else ""
        lines.append(f"{info.model} {info.precision}: {probe}aletheia layers ({src}) {info.layers['aletheia']}; "
                     f"cost_aware {info.layers.get('cost_aware')}; top-half-by-depth {info.layers['top-half-by-depth']}"
                     + (f"; model built/loaded in {info.build_s:.1f}s" if info.build_s == info.build_s else ""))
        if info.note:
            lines.append(f"  {info.note}")
        if info.skipped:
            lines.append(f"  skipped: {info.skipped}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b"], choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--min-steps", type=int, default=3, help="timed steps kept even past the deadline")
    parser.add_argument("--probe-batches", type=int, default=5, help="the project's recipe uses 5")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--target-speedup", type=float, default=1.5, help="cost_aware's speed target")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false")
    parser.add_argument("--checkpointing", action="store_true",
                        help="non-reentrant activation checkpointing without input grads")
    parser.add_argument("--deadline-s", type=float, default=float("inf"),
                        help="start no new section (and cut timed steps to --min-steps) after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tmpdir", default=None, help="where the bf16 checkpoint for 4-bit loading goes")
    parser.add_argument("--json", default=None, help="also write all figures (step times, scores) here")
    parser.add_argument("--table-file", default=None, help="rewrite the results table here after every arm")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    t_start = time.monotonic()
    header = "gpu_speed: " + versions(device)
    log(header)
    report = Report(args, header)
    for name in args.models:
        if time.monotonic() > t_start + args.deadline_s:
            report.sections.append(SectionInfo(name, "all", skipped="deadline"))
            continue
        try:
            bench_model(name, args, device, t_start, report)
        except Exception as exc:  # report and go on to the next model
            import traceback

            traceback.print_exc()
            report.sections.append(SectionInfo(name, "?", skipped=f"failed: {type(exc).__name__}: {exc}"[:400]))
            free_memory(device)
        report.save()
    log(f"\ntotal {time.monotonic() - t_start:.0f}s\n")
    log(report.table())

if __name__ == "__main__":
    main()
