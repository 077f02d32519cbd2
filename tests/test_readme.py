"""The README: its Python examples run as written, its quick start is two commands, its module table is complete."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["labels"].shape == (2, 120, 160)
    assert namespace["crf"].compatibility.grad is not None
    assert namespace["blurred"].shape == (1, 4, 120, 160)


def test_quick_start_is_two_commands():
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", quick, flags=re.MULTILINE)
    assert commands == ["make demo", "make test"]


def test_module_table_names_every_source_file():
    """The README's architecture table states the job of every file of src/crfasrnn, and of nothing else."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| module | its one job |") :].split("\n\n", 1)[0]
    named: set[str] = set()
    for row in table.splitlines()[2:]:
        cell = row.split("|")[1]
        named.update(re.findall(r"`([\w/]+\.py)`", cell))
    package = REPO / "src" / "crfasrnn"
    files = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert files - named == set(), "files of src/crfasrnn missing from the README's module table"
    assert named - files == set(), "the README's module table names files that do not exist"
