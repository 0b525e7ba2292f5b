"""Regenerate python_reference.jsonl: the Python Language Reference topics that ship inside CPython itself
(``pydoc_data.topics``, the text behind ``help("if")``), one JSON record per topic. Licence: see README.md.

    python3 recipes/data/make_corpus.py   # rewrites recipes/data/python_reference.jsonl
"""
import json
import sys
from pathlib import Path

import pydoc_data.topics


def main() -> None:
    out = Path(__file__).with_name("python_reference.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for name in sorted(pydoc_data.topics.topics):
            record = {"id": name, "text": pydoc_data.topics.topics[name],
                      "source": f"CPython {sys.version.split()[0]} pydoc_data.topics"}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
