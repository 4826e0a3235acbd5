"""The one exception type for mistakes a user can fix; the CLI prints it as one line, exit 2."""


class EdlmError(Exception):
    """A user-facing error: bad path, bad flag, bad input. Message says what to change."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can be long), never empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
