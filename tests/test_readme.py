"""The documentation's code runs as written, and its links lead somewhere.

Code blocks of README.md and docs/*.md marked ``<!-- readme-test: KIND -->`` are run: ``python`` blocks are
executed here, and in ``bash`` blocks every ``metric-ds`` line is run through the CLI, against a tiny trained run
(the docs' example paths are made to exist in a working directory). ``sentence-transformers`` and ``onnx`` blocks
are run by tests/test_export.py against exported models. Every relative link points to an existing file, and to an
existing heading when it names one.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_frame

from metric_ds.cli import main

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- readme-test: ([\w-]+) -->")
FENCED = re.compile(r"\s*```(\w+)\n(.*?)```", re.DOTALL)
RUN_HERE = {"python", "bash"}
RUN_BY_TEST_EXPORT = {"sentence-transformers", "onnx", "onnx-reject"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def marked_blocks() -> list[tuple[str, str, str]]:
    """(file, kind, code) of every marked block; a marker without a code block right after it is an error."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for marker in MARKER.finditer(text):
            block = FENCED.match(text, marker.end())
            line = text.count("\n", 0, marker.start()) + 1
            assert block, f"{rel(doc)}:{line}: readme-test marker not followed by a code block"
            found.append((rel(doc), marker.group(1), block.group(2)))
    return found


def blocks(kind: str) -> list[tuple[str, str]]:
    found = [(name, code) for name, tag, code in marked_blocks() if tag == kind]
    assert found, f"no block marked readme-test: {kind} in README.md or docs/*.md"
    return found


def test_every_marker_is_a_code_block_of_a_known_kind():
    kinds = {tag for _, tag, _ in marked_blocks()}
    assert kinds <= RUN_HERE | RUN_BY_TEST_EXPORT, f"unknown readme-test kinds: {kinds - RUN_HERE - RUN_BY_TEST_EXPORT}"
    assert RUN_HERE | RUN_BY_TEST_EXPORT <= kinds, f"no block marked {RUN_HERE | RUN_BY_TEST_EXPORT - kinds}"


def slugs(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of ``doc`` (outside code blocks)."""
    out, fence, seen = set(), False, {}
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(doc: Path) -> list[str]:
    """Targets of the Markdown links of ``doc`` outside code blocks."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL)
    return LINK.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_point_to_existing_files(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            broken.append(f"{target} (no heading #{anchor} in {rel(dest)})")
    assert not broken, f"{rel(doc)}: broken links: {broken}"


@pytest.fixture
def workdir(tmp_path, tiny_run, monkeypatch):
    """A working directory where the docs' paths exist: runs/example/best (a copy: `calibrate` writes into it),
    data/train.parquet, data/val.parquet, data/test.parquet (with out-of-scope rows), new.csv."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_run, tmp_path / "runs" / "example", ignore=shutil.ignore_patterns("checkpoints"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.parquet").symlink_to(tiny_run.parent.parent / "train.parquet")
    make_frame(24, seed=2).to_parquet(tmp_path / "data" / "val.parquet")
    pd.concat([make_frame(24, seed=3), make_frame(8, seed=4).assign(label="unknown")]).to_parquet(
        tmp_path / "data" / "test.parquet")
    make_frame(12, seed=1)[["text"]].to_csv(tmp_path / "new.csv", index=False)
    return tmp_path


PYTHON_BLOCKS, BASH_BLOCKS = blocks("python"), blocks("bash")


@pytest.mark.parametrize("name,code", PYTHON_BLOCKS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PYTHON_BLOCKS)])
def test_python_blocks_run(workdir, name, code, capsys):
    exec(compile(code, name, "exec"), {})
    out = capsys.readouterr().out
    assert "class_" in out


@pytest.mark.parametrize("name,code", BASH_BLOCKS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BASH_BLOCKS)])
def test_cli_blocks_run(workdir, name, code):
    lines = [line for line in code.splitlines() if line.startswith("metric-ds ")]
    assert lines, f"{name}: a bash block marked readme-test has no metric-ds line"
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, f"{name}: {line}"
    predicted = pd.read_csv(workdir / "predicted.csv")
    assert {"text", "pred_label", "pred_score", "top3_label", "knn_label"} <= set(predicted.columns)
    if "--reject" in code:
        assert predicted["in_scope_score"].notna().all()
    if "vectors.npy" in code:
        assert np.load(workdir / "vectors.npy").shape == (12, 16)
