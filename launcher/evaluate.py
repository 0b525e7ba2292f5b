"""`moetron evaluate` / `python -m launcher.evaluate`:
validation loss of a checkpoint, optionally swept over k. The work lives in `launcher/train/evaluate.py`.
"""
from __future__ import annotations

import sys

from launcher.train.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
