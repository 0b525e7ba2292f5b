"""`moetron convert` / `python -m launcher.convert`:
convert a checkpoint to or from Hugging Face format. The work lives in `launcher/hf/convert.py`.
"""
from __future__ import annotations

import sys

from launcher.hf.convert import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
