"""The one error contract of every moetron command: a problem with what the user gave is a :class:`MoetronError`
(a subclass per kind), printed by :func:`report` as one ``moetron: <kind> error: <message>`` line on stderr, exit
code 2 (``exit_code``), never a traceback."""
from __future__ import annotations

import argparse
import sys

from launcher import env, log


class MoetronError(Exception):
    """A problem with what the user gave (a command line, a recipe, data, a checkpoint): the message is exactly one
    line that names what is wrong and what to do; line breaks inside anything it quotes are escaped so it stays one
    line. Subclasses name their ``kind`` (the word before ``error:``)."""

    kind = "input"
    exit_code = 2

    def __init__(self, message: str):
        super().__init__(str(message).replace("\n", "\\n"))


class UsageError(MoetronError):
    """A bad command line (argument, command name)."""

    kind = "usage"


def report(error: MoetronError, every_rank: bool = True) -> int:
    """Print ``error`` as its one line and return its exit code. ``every_rank=False``: every rank found the same
    error (a config read before process groups exist), so only rank 0 prints it, once for the whole job."""
    if every_rank or env.rank() == 0:
        log.ROOT.error(f"{error.kind} error: {error}")
    return error.exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line like every other bad input: one line, exit code 2 (argparse would
    print the whole usage first)."""

    def error(self, message: str):
        sys.exit(report(UsageError(f"{message} (see {self.prog} --help)")))
