"""`moetron <command> ...`: pretrain | preprocess | evaluate | convert | config | torchrun. Each command is a module with main(argv)
and is also ``python -m <module>``; `moetron --version` names the installed version."""
from __future__ import annotations

import importlib
import sys

from launcher.errors import UsageError, report

COMMANDS = {
    "pretrain": ("launcher.pretrain", "train a model from a YAML recipe (+ dotted overrides)"),
    "preprocess": ("launcher.preprocess", "tokenize raw text into webdataset shards"),
    "evaluate": ("launcher.evaluate", "validation loss of a checkpoint, optionally swept over k (M-MoE)"),
    "convert": ("launcher.convert", "convert a checkpoint to/from Hugging Face format"),
    "config": ("launcher.config", "the config: every key's value, type, default, range and meaning"),
    "torchrun": ("launcher.torchrun", "torchrun (same arguments) that ends in one line, not a traceback, on a signal"),
}


def _usage() -> str:
    lines = ["usage: moetron <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("moetron")
    except PackageNotFoundError:
        return "unknown (not installed: run launcher/install.sh)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"moetron {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return report(UsageError(f"unknown command '{name}': use one of {', '.join(COMMANDS)} (moetron --help)"))
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
