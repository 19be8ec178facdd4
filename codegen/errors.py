"""The one error the generator raises for bad input."""

from __future__ import annotations


class GeneratorError(Exception):
    """Input the generator cannot turn into bindings.

    Carries where (file:line) and the offending text, so the message can be
    acted on without reading the generator.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 text: str | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.text = text
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        out = f"{where}{self.message}"
        if self.text:
            out += "\n    " + self.text.strip()
        return out
