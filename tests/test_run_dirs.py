"""Every run directory the docs' commands set (``logging.run_dir=...``) and every recipe's ``logging.run_dir`` are
pairwise distinct: running two documented commands never makes one resume (or skip as finished) the other's run."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _run_dirs() -> list[tuple[str, str]]:
    """(run_dir, where it is set) for each recipe and each documented command line that overrides it."""
    found = [(yaml.safe_load(p.read_text())["logging"]["run_dir"], p.name)
             for p in sorted(REPO.glob("recipes/*.yaml"))]
    for doc in [REPO / "README.md", *sorted(REPO.glob("docs/*.md")), REPO / "slurm" / "README.md"]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            found += [(d, f"{doc.relative_to(REPO)}:{n}") for d in re.findall(r"logging\.run_dir=(\S+)", line)]
    return found


def test_documented_and_recipe_run_dirs_are_distinct():
    found = _run_dirs()
    assert any(where.startswith("README.md") for _, where in found)  # the parse sees the README's commands
    seen: dict[str, str] = {}
    for run_dir, where in found:
        assert run_dir.rstrip("/") not in seen, f"{where} reuses {run_dir} of {seen[run_dir.rstrip('/')]}"
        seen[run_dir.rstrip("/")] = where
