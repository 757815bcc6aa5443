"""The README and docs/ examples run, so they cannot rot: every `aletheia-hpc` command line parses
and its overrides compose into a plan (or a cell), every `make` target exists, every YAML, JSON and
Python block parses, and every relative link points at a file."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from aletheia_hpc import cli
from aletheia_hpc.campaign.matrix import compose_root, expand

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
README_LIMIT_BYTES = 8 * 1024


def blocks(language: str) -> list[tuple[str, str]]:
    return [(page.name, body) for page in PAGES for lang, body in FENCE.findall(page.read_text())
            if lang == language]


def command_lines(program: str) -> list[tuple[str, list[str]]]:
    """(page, words after ``program``) of every shell line that runs it."""
    out = []
    for page, body in blocks("bash"):
        for line in body.splitlines():
            for part in re.split(r"&&|;", line.split(" #")[0]):
                words = shlex.split(part)
                if words and Path(words[0]).name == program:
                    out.append((page, words[1:]))
    return out


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_bytes()) <= README_LIMIT_BYTES


def test_every_relative_link_points_at_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:  # every page under docs/ (README is PAGES[0])
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"


def test_yaml_json_and_python_examples_parse():
    assert blocks("yaml") and blocks("python")
    for page, body in blocks("yaml"):
        assert isinstance(yaml.safe_load(body), dict), page
    for page, body in blocks("json"):
        json.loads(body)
    for page, body in blocks("python"):
        ast.parse(body, filename=page)


def test_every_make_target_in_the_docs_exists():
    targets = {words[0] for _, words in command_lines("make") if words}
    targets |= {t for page in PAGES for t in re.findall(r"`make ([\w-]+)`", page.read_text())}
    assert {"demo", "test", "test-fast"} <= targets
    for target in targets:
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"


def cli_examples() -> list[tuple[str, str, tuple[str, ...]]]:
    """(page, verb, overrides) of every `aletheia-hpc` line, parsed by the CLI's own parse: it fails on
    an unknown verb or a flag the verb does not take."""
    out = []
    for page, words in command_lines("aletheia-hpc"):
        args = cli.parse(words)
        out.append((page, args.verb, tuple(args.overrides)))
    return out


def test_every_cli_example_parses():
    assert len(cli_examples()) >= 8


@pytest.mark.slow  # composes the paper campaigns' full matrices (about a minute on 2 cores)
def test_every_cli_examples_overrides_compose():
    for verb, overrides in sorted({(verb, o) for _, verb, o in cli_examples()}):
        if verb == "run-cell":
            compose_root(list(overrides))
        elif verb != "logs":
            assert expand(list(overrides)).cells, (verb, overrides)


@pytest.mark.parametrize("script", ["slurm/dev-cluster", "scripts/setup.sh", "scripts/test.sh"])
def test_scripts_the_docs_name_exist(script):
    assert (ROOT / script).is_file()
