"""The error kind every moetron command prints as ``moetron: <kind> error: <message>`` and exits 2 on."""
from __future__ import annotations


class OneLineError(ValueError):
    """A problem with what the user gave (a recipe, data, a checkpoint): the message is exactly one line that names
    what is wrong and what to do; line breaks inside anything it quotes are escaped so it stays one line."""

    def __init__(self, message: str):
        super().__init__(str(message).replace("\n", "\\n"))
