"""Single-pass vs chunked (8 layers at a time) gradient probe on llama-style models of 16, 48 and 80
layers (80: the depth of the paper's 70B and 72B models).

Prints, per depth, both times, their ratio and the largest relative score difference, then checks
the floor at 80 layers: single-pass at least 4x faster than chunked-8, scores identical (1e-6).
    .venv/bin/python bench/probe.py [--hidden 256] [--batches 5] [--seq 128]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from aletheia_hpc.method import probe_layer_scores


FLOOR_SPEEDUP = 4.0
FLOOR_SCORE_DIFF = 1e-6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 48, 80])
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 4096, (args.batch_size, args.seq), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.seq, dtype=torch.long)}
               for _ in range(args.batches)]
    results = []
    for depth in args.depths:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=depth)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        probe_layer_scores(model, batches[:1])  # warm-up
        t0 = time.perf_counter()
        single = probe_layer_scores(model, batches, mode="single_pass")
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        chunked = probe_layer_scores(model, batches, mode="chunked", chunk_size=8)
        t_chunked = time.perf_counter() - t0
        diff = max(abs(a - b) / abs(b) for a, b in zip(single, chunked))
        results.append((depth, t_single, t_chunked, diff))
        print(f"layers={depth}: single_pass {t_single:.2f}s  chunked {t_chunked:.2f}s", flush=True)
    print(f"\nprobe benchmark (hidden {args.hidden}, {args.batches} batches of {args.batch_size}x{args.seq}, "
          f"{torch.get_num_threads()} threads)")
    for depth, t_single, t_chunked, diff in results:
        print(f"  {depth:3d} layers: chunked/single time ratio {t_chunked / t_single:.2f}x, "
              f"max relative score difference {diff:.1e}")
    deepest = max(results)
    depth, t_single, t_chunked, diff = deepest
    ok = t_chunked / t_single >= FLOOR_SPEEDUP and diff <= FLOOR_SCORE_DIFF
    print(f"floor at {depth} layers: single-pass >= {FLOOR_SPEEDUP:.0f}x faster than chunked-8 and scores equal "
          f"to {FLOOR_SCORE_DIFF:.0e}: {'PASS' if ok else 'FAIL'} ({t_chunked / t_single:.2f}x, {diff:.1e})")


if __name__ == "__main__":
    main()
