"""Cost-aware selection vs aletheia, standard LoRA and the top half by depth: speed and quality on
the real SmolLM2-135M-Instruct on this machine's CPU, at the demo's size (campaigns/demo.yaml:
batch 4, max_seq_len 192, 24 optimizer steps, grad_accum 1, warmup 2, cosine, lr 2e-4, probe of 3
batches, 800 builtin records with 48 held out).

Per seed: one probe and one step-cost calibration (as a cell does), then every arm gets its LoRA
(same seed for the adapters' init), and all arms train on the same batches in the same order,
interleaved step by step (the arm order rotates each step) so that machine noise hits every arm
alike (aletheia_hpc/method/timing.py). Then the held-out loss of each arm.

Prints, per arm: the median step ratio vs standard (median standard step / median arm step over
the timed steps of all seeds; the first step of each seed is not timed) with a 95 % bootstrap CI
over paired steps; the cost model's predicted speedup (mean over seeds); the eval loss (mean over
seeds, 95 % t-interval); and the paired eval-loss differences vs aletheia, per seed and as a mean
with its 95 % t-interval. Then the issue's floor: cost_aware >= 1.5x AND lower eval loss than
aletheia in every seed.
    .venv/bin/python bench/cost_aware.py [--seeds 42 123 999] [--steps 24] [--targets 1.5] [--depth-floors 0.333]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from transformers import get_scheduler

from aletheia_hpc.aggregate.stats import median_ratio_ci
from aletheia_hpc.campaign.matrix import compose_root
from aletheia_hpc.data.instructions import PadCollator, load_records, split_records, tokenize_records
from aletheia_hpc.method import (LoraRanks, apply_lora, calibrate_step_cost, get_family, probe_layer_scores,
                                 select_cost_aware, select_layers, time_interleaved)
from aletheia_hpc.models.loading import load_model
from aletheia_hpc.worker.cell import probe_batches
from aletheia_hpc.worker.training import held_out_loss

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def report(m, r, steps, seeds, arm_names, times, results, elapsed, final) -> None:
    """The summary over the seeds done so far (printed after every seed, so a stopped run keeps it)."""
    status = "" if final else f"(running, after seed {seeds[-1]}) "
    print(f"\n{status}cost-aware benchmark: {m.name} on the CPU ({torch.get_num_threads()} threads), "
          f"batch {m.batch_size}, "
          f"max_seq_len {m.max_seq_len}, {steps} steps, seeds {seeds}, ranks {r.attention_rank}/{r.mlp_rank}, "
          f"layer budget {r.layer_pct:g}%; {len(times['standard'])} paired timed steps per arm; "
          f"{elapsed:.0f}s so far")
    print(f"{'arm':20s} {'step ratio vs standard [95% CI]':34s} {'predicted':>9s}  "
          f"{'eval loss [95% CI]':26s} eval loss - aletheia per seed; mean [95% CI]")
    summary = {}
    for name in arm_names:
        ratio = median_ratio_ci(times["standard"], times[name])
        loss = t_interval(results[name]["loss"])
        diffs = [a - b for a, b in zip(results[name]["loss"], results["aletheia"]["loss"])]
        diff = t_interval(diffs)
        summary[name] = (ratio, diffs)
        print(f"{name:20s} {ratio[0]:.3f}x [{ratio[1]:.3f}, {ratio[2]:.3f}]{'':13s} "
              f"{statistics.fmean(results[name]['predicted']):8.3f}x  "
              f"{loss[0]:.4f} [{loss[1]:.4f}, {loss[2]:.4f}]  "
              f"{', '.join(f'{x:+.4f}' for x in diffs)}; {diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]")
    for name in arm_names:
        lows = [min(layers) for layers in results[name]["layers"]]
        sizes = [len(layers) for layers in results[name]["layers"]]
        print(f"  {name:20s} adapted layers per seed {sizes}, lowest adapted layer per seed {lows}")
    (ratio, diffs) = summary["cost_aware"]
    speed_ok, quality_ok = ratio[0] >= 1.5, all(x < 0 for x in diffs)
    print(f"floor (issue 14): cost_aware step ratio {ratio[0]:.3f}x >= 1.5x: {'met' if speed_ok else 'MISSED'}; "
          f"eval loss below aletheia's in every seed: {'met' if quality_ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 999])
    parser.add_argument("--steps", type=int, default=None, help="default: the demo's train.steps")
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="cost_aware speed targets (default: the recipe's); the first is the arm 'cost_aware'")
    parser.add_argument("--depth-floors", type=float, nargs="*", default=[],
                        help="extra arms, one per depth fraction d: the top layers by score (aletheia's budget) "
                             "among layers >= round(d * L), e.g. 0.333 for the upper two thirds")
    args = parser.parse_args()
    if any(not 0 <= d < 1 for d in args.depth_floors):
        parser.error(f"--depth-floors {args.depth_floors}: each must be in [0, 1) (a fraction of the depth)")
    root = compose_root(["campaign=demo", "model=smollm2-135m-instruct", "recipe=cost_aware"])
    m, r, t, d = root.model, root.recipe, root.train, root.data
    steps = args.steps or t.steps
    targets = args.targets or [r.cost.target_speedup]
    device = torch.device("cpu")
    t0 = time.perf_counter()
    base, tokenizer = load_model(m, device)
    print(f"loaded {m.name} in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} threads", flush=True)
    family, ranks = get_family(m.family), LoraRanks(r.attention_rank, r.mlp_rank, r.alpha_factor, r.dropout)
    train_records, held_out = split_records(load_records(d.source, d.builtin_size), d.eval_size, d.split_seed)
    train_examples = tokenize_records(train_records, tokenizer, m.max_seq_len, d.template)
    eval_examples = tokenize_records(held_out, tokenizer, m.max_seq_len, d.template)
    collator = PadCollator(tokenizer.pad_token_id)
    L = m.num_layers
    arm_names = ["standard", "aletheia"] + [("cost_aware" if i == 0 else f"cost_aware@{x}")
                                            for i, x in enumerate(targets)] + ["top-half-by-depth"]
    floors = {f"top-by-score-from-{round(d * L)}": round(d * L) for d in args.depth_floors}
    arm_names += list(floors)
    times = {name: [] for name in arm_names}  # timed steps of all seeds, paired by index
    results = {name: {"loss": [], "predicted": [], "layers": []} for name in arm_names}

    for seed in args.seeds:
        t_seed = time.perf_counter()
        batches = probe_batches(train_examples, collator, r.probe.batch_size or m.batch_size, r.probe.batches,
                                seed, r.probe.loss_tokens)
        scores = probe_layer_scores(base, batches, family=family, mode=r.probe.mode, chunk_size=r.probe.chunk_size,
                                    norm=r.probe.norm)
        cost = calibrate_step_cost(base, batches, ranks, family=family, steps=r.cost.calibration_steps,
                                   warmup=r.cost.calibration_warmup, max_grad_norm=t.max_grad_norm)
        arms = {"standard": list(range(L)), "aletheia": select_layers(scores, r.layer_pct)}
        for name, target in zip(arm_names[2:], targets):
            arms[name] = select_cost_aware(scores, cost, target, r.layer_pct)
        arms["top-half-by-depth"] = select_layers(scores, r.layer_pct, "last")
        for name, lowest in floors.items():  # aletheia's rule on the layers at or above ``lowest``
            arms[name] = [lowest + i for i in select_layers(scores[lowest:], min(100.0, r.layer_pct * L / (L - lowest)))]
        print(f"\nseed {seed}: cost model fixed {cost.fixed_s:.3f}s, backward/layer {cost.backward_layer_s:.4f}s, "
              f"adapters/layer {cost.adapter_layer_s:.4f}s (calibration {cost.calibration_s:.1f}s)", flush=True)
        models, optimizers, schedulers = {}, {}, {}
        for name, layers in arms.items():
            torch.manual_seed(seed)
            models[name] = apply_lora(copy.deepcopy(base), family, layers, ranks)
            models[name].train()
            params = [p for p in models[name].parameters() if p.requires_grad]
            optimizers[name] = torch.optim.AdamW(params, lr=t.lr or m.lr, betas=(t.adam_beta1, t.adam_beta2),
                                                 eps=t.adam_eps, weight_decay=t.weight_decay)
            schedulers[name] = get_scheduler(t.scheduler, optimizers[name], num_warmup_steps=t.warmup_steps,
                                             num_training_steps=steps)
            results[name]["predicted"].append(cost.speedup(layers))
            results[name]["layers"].append(layers)
            print(f"  {name:20s} layers {layers}  predicted speedup {cost.speedup(layers):.3f}x", flush=True)
        order = list(range(len(train_examples)))
        random.Random(seed).shuffle(order)
        names = list(arms)
        batches = [collator([train_examples[i] for i in order[step * m.batch_size:(step + 1) * m.batch_size]])
                   for step in range(steps)]
        losses = {name: [] for name in names}

        def step_of(name):
            model, optimizer, scheduler = models[name], optimizers[name], schedulers[name]
            params = [p for p in model.parameters() if p.requires_grad]

            def run(i):
                loss = model(**batches[i], use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses[name].append(loss.detach())
            return run

        # the first step of a seed warms caches and allocates optimizer state: not timed
        seed_times = time_interleaved({name: step_of(name) for name in names}, rounds=steps - 1, warmup=1)
        for name in names:
            times[name] += seed_times[name]
        print("  train loss first/last step: " + "  ".join(f"{n} {losses[n][0].item():.3f}/{losses[n][-1].item():.3f}"
                                                          for n in names), flush=True)
        for name in names:
            results[name]["loss"].append(held_out_loss(models[name], eval_examples, collator, m.batch_size, device))
        print("  eval loss: " + "  ".join(f"{n} {results[n]['loss'][-1]:.4f}" for n in names)
              + f"  (seed took {time.perf_counter() - t_seed:.0f}s)", flush=True)
        del models, optimizers, schedulers

        report(m, r, steps, args.seeds[:len(results["standard"]["loss"])], arm_names, times, results,
               time.perf_counter() - t0, final=seed == args.seeds[-1])


if __name__ == "__main__":
    main()
