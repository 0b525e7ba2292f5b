"""Session fixtures: a small slice of the shipped corpus, preprocessed once."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.launcher.data.helpers import corpus_docs, preprocess, write_jsonl


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return corpus_docs(40_000)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, docs) -> Path:
    """Shards of ``docs`` (all in the train split), seq_length 32, 64 samples per shard."""
    root = tmp_path_factory.mktemp("shards")
    preprocess([write_jsonl(root / "docs.jsonl", docs)], root / "out")
    return root / "out"
