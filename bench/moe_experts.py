"""Mixtral's experts fused (16/32-bit 3-D tensors) against split into per-expert Linear modules,
unquantized, 4-bit NF4 and 8-bit: the experts' weight bytes, the whole model's weight bytes, the LoRA
parameters, the training step time and the logits' distance to the fused model, on a random-init
Mixtral config loaded through the project's loader (models/loading.py, models/moe_experts.py).

    .venv/bin/python bench/moe_experts.py [--hidden 256] [--intermediate 512] [--experts 8] [--layers 4]
                                          [--batch 4] [--seq 128] [--steps 5]

On a CUDA GPU it runs in bf16 and adds each form's peak memory at load and in training.
"""

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from aletheia_hpc.config import ModelConfig, ResourcesConfig
from aletheia_hpc.method import apply_lora, get_family
from aletheia_hpc.method.step import lora_optimizer, lora_step, trainable_parameters
from aletheia_hpc.models.loading import load_model
from aletheia_hpc.models.moe_experts import experts_in, experts_weight_bytes, family_for, split_fused_experts
from aletheia_hpc.models.tiny import tiny_config
from aletheia_hpc.models.tokenizer import tiny_tokenizer

FORMS = ("fused", "per-expert unquantized", "per-expert nf4", "per-expert int8")


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (packed 4/8-bit weights as stored), statistics aside."""
    return sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))


def load(form: str, folder: str, layers: int, device: torch.device):
    quantization = form.rpartition(" ")[2] if form.endswith(("nf4", "int8")) else "none"
    cfg = ModelConfig(name="bench-mixtral", family="mixtral", kind="local", path=folder, num_layers=layers,
                      precision="bf16" if device.type == "cuda" else "fp32", quantization=quantization,
                      resources=ResourcesConfig(gpus=int(device.type == "cuda")))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, _ = load_model(cfg, device)
    if form == "per-expert unquantized":
        split_fused_experts(model, None)
    peak_load = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return model, peak_load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one untimed")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = tiny_config("mixtral", args.layers)
    config.update({"hidden_size": args.hidden, "intermediate_size": args.intermediate,
                   "num_local_experts": args.experts, "num_attention_heads": 8, "num_key_value_heads": 4})
    ids = torch.randint(4, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        reference = None
        for form in FORMS:
            model, peak_load = load(form, folder, args.layers, device)
            label, expert_bytes, all_bytes = experts_in(model), experts_weight_bytes(model), weight_bytes(model)
            model.train()  # before any eval-mode forward: bitsandbytes' CPU kernel repacks for inference
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()
            if reference is None:
                reference = logits
            distance = ((logits - reference).abs().max() / reference.abs().max()).item()
            peft_model = apply_lora(model, family_for(model, get_family("mixtral")), range(args.layers))
            trainable = trainable_parameters(peft_model)
            optimizer = lora_optimizer(peft_model, lr=1e-4)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for step in range(args.steps + 1):
                t0 = time.perf_counter()
                lora_step(peft_model, [{"input_ids": ids, "labels": ids}], optimizer)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step:
                    times.append(time.perf_counter() - t0)
            peak_train = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            results.append((form, label, expert_bytes, all_bytes, sum(p.numel() for p in trainable),
                            statistics.median(times), distance, peak_load, peak_train))
            print(f"{form}: done ({label})", flush=True)
            del peft_model, model, optimizer, trainable
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\nMixtral random-init: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of "
          f"intermediate {args.intermediate}, top-{config.num_experts_per_tok}; batch {args.batch}x{args.seq}, "
          f"LoRA r16 attention / r64 experts on every layer, method.step.lora_step (fused AdamW, clip 1.0); device {device.type}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    fused_bytes = results[0][2]
    header = (f"{'form':24s} {'experts as':20s} {'expert MiB':>10s} {'vs fused':>8s} {'model MiB':>9s} "
              f"{'LoRA params':>11s} {'step s':>7s} {'max |dlogit|':>12s}")
    if device.type == "cuda":
        header += f" {'load GiB':>8s} {'train GiB':>9s}"
    print(header)
    for form, label, expert_bytes, all_bytes, lora, step, distance, peak_load, peak_train in results:
        line = (f"{form:24s} {label:20s} {expert_bytes / 2**20:10.2f} {expert_bytes / fused_bytes:8.3f} "
                f"{all_bytes / 2**20:9.2f} {lora:11,d} {step:7.3f} {distance:12.2e}")
        if device.type == "cuda":
            line += f" {peak_load / 2**30:8.2f} {peak_train / 2**30:9.2f}"
        print(line)
    print("max |dlogit|: largest logit difference to the fused model before training, relative to its largest logit")


if __name__ == "__main__":
    main()
