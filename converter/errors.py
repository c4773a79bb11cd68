"""The one exception type whose message is meant for the user (one line, names the file)."""


class ConversionError(Exception):
    """Bad input or a refused operation. The CLI prints `error: <message>` and exits non-zero."""

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = details or []  # e.g. the offending keys, printed below the line


class NotYet(ConversionError):
    """A model the tool recognises but cannot write in the layout asked for yet (a table variant's
    `no_class`: no Diffusers class for it)."""
