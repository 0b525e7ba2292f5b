"""The error kind every moetron command prints as ``moetron: <kind> error: <message>`` and exits 2 on."""
from __future__ import annotations

import argparse


class OneLineError(ValueError):
    """A problem with what the user gave (a recipe, data, a checkpoint): the message is exactly one line that names
    what is wrong and what to do; line breaks inside anything it quotes are escaped so it stays one line."""

    def __init__(self, message: str):
        super().__init__(str(message).replace("\n", "\\n"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line like every other bad input: one line, exit code 2 (argparse would
    print the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
