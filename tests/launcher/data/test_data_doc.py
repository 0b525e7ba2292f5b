"""docs/data.md's reading snippets, run as written on a small preprocess output, read exactly the split the index
describes: the shard-format page cannot go stale."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from launcher.data.format import read_index
from tests.launcher.data.helpers import preprocess, write_jsonl

DOC = Path(__file__).resolve().parents[3] / "docs" / "data.md"


def test_documented_reading_snippets_read_every_sample_and_label(tmp_path, docs):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2, "docs/data.md: expected the webdataset and the numpy reading snippets"
    out = tmp_path / "data" / "smoke"
    preprocess([write_jsonl(tmp_path / "d.jsonl", docs[:8])], out, "--valid-fraction", "0.25")
    valid = read_index(out)["splits"]["valid"]
    expected = f"{valid['num_samples']} {sum(s['num_tokens'] for s in valid['shards'])}"
    assert valid["num_samples"] > 1 and len(valid["shards"]) > 1  # several shards, read in order
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split("\n")[-2] == expected, (code, proc.stdout)
