"""`moetron <command> ...`: pretrain | preprocess | evaluate | convert. Each command is a module with main(argv)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pretrain": ("launcher.pretrain", "train a model from a YAML recipe (+ dotted overrides)"),
    "preprocess": ("launcher.preprocess", "tokenize raw text into webdataset shards"),
    "evaluate": ("launcher.evaluate", "validation loss of a checkpoint, optionally swept over k (M-MoE)"),
    "convert": ("launcher.convert", "convert a checkpoint to/from Hugging Face format"),
}


def _usage() -> str:
    lines = ["usage: moetron <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moetron: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
