"""EvalSettings: defaults, validation messages, and embedding in an OmegaConf structured config."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from aletheia_hpc.evaluation.settings import (BENCHMARKS, EvalSettings, coerce_settings,
                                              subset_size, validate)


def test_defaults_match_the_issue():
    s = EvalSettings()
    assert s.benchmarks == ["mmlu", "gsm8k", "humaneval"]
    assert (s.mmlu_n, s.mmlu_shots, s.gsm8k_n, s.gsm8k_max_new_tokens) == (200, 0, 200, 256)
    assert (s.humaneval_n, s.humaneval_max_new_tokens, s.humaneval_timeout_s) == (None, 384, 10.0)
    assert (s.subset_seed, s.batch_size, s.source, s.data_dir) == (1234, 8, "auto", None)
    assert validate(s) is s
    # each instance has its own list
    assert EvalSettings().benchmarks is not s.benchmarks


@pytest.mark.parametrize("change, field_name, words", [
    ({"benchmarks": ["mmlu", "arc"]}, "benchmarks", "arc"),
    ({"benchmarks": ["mmlu", "mmlu"]}, "benchmarks", "more than once"),
    ({"mmlu_n": -1}, "mmlu_n", "below 0"),
    ({"gsm8k_n": -5}, "gsm8k_n", "below 0"),
    ({"humaneval_n": -2}, "humaneval_n", "below 0"),
    ({"mmlu_shots": -1}, "mmlu_shots", "below 0"),
    ({"batch_size": 0}, "batch_size", "positive"),
    ({"gsm8k_max_new_tokens": 0}, "gsm8k_max_new_tokens", "positive"),
    ({"humaneval_timeout_s": 0}, "humaneval_timeout_s", "positive"),
    ({"humaneval_workers": 0}, "humaneval_workers", "positive"),
    ({"humaneval_memory_mb": 10}, "humaneval_memory_mb", "64"),
    ({"source": "s3"}, "source", "auto"),
    ({"source": "local"}, "data_dir", "data_dir"),
    ({"mmlu_n": 2.5}, "mmlu_n", "integer"),
])
def test_validate_names_field_and_fix(change, field_name, words):
    with pytest.raises(ValueError) as info:
        validate(dataclasses.replace(EvalSettings(), **change))
    message = str(info.value)
    assert f"eval.{field_name}" in message and words in message


def test_zero_means_all_and_empty_benchmarks_is_valid():
    validate(EvalSettings(benchmarks=[], mmlu_n=0, gsm8k_n=0, humaneval_n=0))
    assert subset_size(0, 164) == 164 and subset_size(None, 164) == 164
    assert subset_size(10, 164) == 10 and subset_size(500, 164) == 164


def test_embeds_in_omegaconf_structured_config_and_round_trips():
    @dataclasses.dataclass
    class Cell:
        eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)

    cfg = OmegaConf.structured(Cell)
    cfg.merge_with(OmegaConf.from_dotlist(["eval.benchmarks=[mmlu,gsm8k]", "eval.mmlu_n=50",
                                           "eval.humaneval_n=10", "eval.source=offline"]))
    with pytest.raises(Exception):  # typed: a string where an int goes is rejected by OmegaConf
        cfg.eval.mmlu_n = "many"
    settings = coerce_settings(cfg.eval)
    assert isinstance(settings, EvalSettings)
    assert settings.benchmarks == ["mmlu", "gsm8k"] and settings.mmlu_n == 50
    assert settings.humaneval_n == 10 and settings.source == "offline"
    assert OmegaConf.to_object(cfg).eval == settings


def test_coerce_from_dict_rejects_unknown_keys():
    assert coerce_settings({"benchmarks": ["gsm8k"], "gsm8k_n": 3}).gsm8k_n == 3
    with pytest.raises(ValueError, match="mmlu_count"):
        coerce_settings({"mmlu_count": 3})
    with pytest.raises(ValueError, match="eval.benchmarks"):
        coerce_settings({"benchmarks": ["MMLU"]})
    assert set(BENCHMARKS) == {"mmlu", "gsm8k", "humaneval", "task", "arc_easy", "arc_challenge", "piqa",
                               "sciq", "hellaswag"}


def test_sandbox_requirements_are_typed_and_name_real_features():
    from aletheia_hpc.evaluation import sandbox
    from aletheia_hpc.evaluation.settings import SANDBOX_FEATURES

    assert tuple(sandbox.FEATURES) == SANDBOX_FEATURES == tuple(sandbox.FIXES)
    typed = OmegaConf.structured(EvalSettings)
    merged = OmegaConf.merge(typed, OmegaConf.from_dotlist(["sandbox.require=[net,pid,landlock]"]))
    assert coerce_settings(merged).sandbox.require == ["net", "pid", "landlock"]
    for sandbox_setting, words in (({"require": ["net", "nett"]}, "eval.sandbox.require: unknown.*nett"),
                                   ({"require": "net"}, "eval.sandbox.require='net'.*list"),
                                   ({"needs": ["net"]}, "eval.sandbox: unknown.*needs")):
        with pytest.raises(ValueError, match=words):
            coerce_settings({"sandbox": sandbox_setting})
