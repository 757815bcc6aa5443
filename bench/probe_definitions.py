"""How often the two probe definitions pick the same layers on the real SmolLM2-135M-Instruct.

Ours (the default): per batch, the L2 norm of the whole layer's gradient, loss over the response
tokens, batches of model.batch_size sequences. The paper authors' (aletheia-lora): the sum of each
parameter tensor's gradient norm, loss over every token, batches of one sequence. Both score the
same 5 probe batches' worth of training records per seed (drawn by the seed, as a cell draws them)
and select the top half; prints per seed the Jaccard index of the two selections and Spearman's rho
of the two score vectors, then their means.
    .venv/bin/python bench/probe_definitions.py [--seeds 42 123 999] [--batches 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy import stats as sps

from aletheia_hpc.campaign.matrix import compose_root
from aletheia_hpc.data.instructions import PadCollator, load_records, split_records, tokenize_records
from aletheia_hpc.method import get_family, probe_layer_scores, select_layers
from aletheia_hpc.models.loading import load_model
from aletheia_hpc.worker.cell import probe_batches

DEFINITIONS = {  # name -> (norm, loss_tokens, sequences per batch; 0 = the model's batch size)
    "ours (layer, response, batch 4)": ("layer", "response", 0),
    "aletheia-lora (tensor_sum, all, batch 1)": ("tensor_sum", "all", 1),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 999])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--max-seq-len", type=int, default=192)
    args = parser.parse_args()
    root = compose_root(["model=smollm2-135m-instruct", "recipe=aletheia", f"model.max_seq_len={args.max_seq_len}",
                         "data.builtin_size=800", "data.eval_size=48"])
    m = root.model
    model, tokenizer = load_model(m, torch.device("cpu"))
    records = load_records(root.data.source, root.data.builtin_size)
    train, _ = split_records(records, root.data.eval_size, root.data.split_seed)
    examples = tokenize_records(train, tokenizer, m.max_seq_len, root.data.template)
    collator = PadCollator(tokenizer.pad_token_id)
    family = get_family(m.family)
    jaccards, rhos = [], []
    for seed in args.seeds:
        chosen, scores = {}, {}
        for name, (norm, tokens, batch_size) in DEFINITIONS.items():
            size = batch_size or m.batch_size
            # the same records for both: batches of one sequence are the 4-sequence batches split up
            n_batches = args.batches * (m.batch_size // size)
            batches = probe_batches(examples, collator, size, n_batches, seed, tokens)
            t0 = time.perf_counter()
            scores[name] = probe_layer_scores(model, batches, family=family, norm=norm)
            chosen[name] = set(select_layers(scores[name], 50))
            print(f"seed {seed} {name}: {time.perf_counter() - t0:.1f}s, layers {sorted(chosen[name])}", flush=True)
        a, b = chosen.values()
        jaccards.append(len(a & b) / len(a | b))
        rhos.append(sps.spearmanr(*scores.values()).statistic)
        print(f"seed {seed}: Jaccard {jaccards[-1]:.3f}, Spearman {rhos[-1]:.3f}", flush=True)
    print(f"\nSmolLM2-135M-Instruct, {args.batches} x {m.batch_size} probe records per seed, top 50%: "
          f"Jaccard mean {sum(jaccards) / len(jaccards):.3f} (min {min(jaccards):.3f}), "
          f"Spearman mean {sum(rhos) / len(rhos):.3f} (min {min(rhos):.3f}) over seeds {args.seeds}")


if __name__ == "__main__":
    main()
