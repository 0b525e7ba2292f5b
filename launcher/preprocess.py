"""`moetron preprocess` / `python -m launcher.preprocess`:
tokenize raw text into webdataset shards. The work lives in `launcher/data/preprocess.py`.
"""
from __future__ import annotations

import sys

from launcher.data.preprocess import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
