"""Standard vs selective LoRA: time per optimizer step, in one run, on a CPU reference model.

Reference model: llama-style, hidden 512, 12 layers, batch 4 x 256, gradient accumulation 2,
LoRA ranks 16 (attention) / 64 (MLP). Three arms share the model and data: standard (all layers),
aletheia (the probe's top half) and the top half by depth. Arms are interleaved step by step so
that machine noise hits all of them alike (aletheia_hpc/method/timing.py, the arm going first
rotating each step). Prints per-arm median step time and the ratios.
    .venv/bin/python bench/speed.py [--steps 6] [--layers 12]
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from aletheia_hpc.method import LoraRanks, apply_lora, family_of, probe_layer_scores, select_layers, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--accum", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=args.layers)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    family = family_of(base)
    g = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, 8192, (args.batch_size, args.seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    t0 = time.perf_counter()
    scores = probe_layer_scores(base, [batch() for _ in range(5)])
    probe_s = time.perf_counter() - t0
    half = args.layers // 2
    arms = {"standard": list(range(args.layers)), "aletheia": select_layers(scores, 50),
            "top-half-by-depth": list(range(args.layers - half, args.layers))}
    models, optimizers = {}, {}
    for name, layers in arms.items():
        models[name] = apply_lora(copy.deepcopy(base), family, layers, LoraRanks(16, 64))
        models[name].train()
        optimizers[name] = torch.optim.AdamW([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
    rounds = [[batch() for _ in range(args.accum)] for _ in range(args.warmup + args.steps)]

    def step(name):
        def run(i):
            for b in rounds[i]:
                (models[name](**b).loss / args.accum).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return run

    times = time_interleaved({name: step(name) for name in arms}, rounds=args.steps, warmup=args.warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nspeed benchmark: llama-style hidden {args.hidden}, {args.layers} layers, batch "
          f"{args.batch_size}x{args.seq}, accumulation {args.accum}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps; probe took {probe_s:.1f}s")
    for name, layers in arms.items():
        print(f"  {name:18s} median step {med[name]:.3f}s  layers {layers}")
    for name in ("aletheia", "top-half-by-depth"):
        print(f"  ratio standard/{name}: {med['standard'] / med[name]:.3f}x (paper, A100 mean: 1.305x)")


if __name__ == "__main__":
    main()
