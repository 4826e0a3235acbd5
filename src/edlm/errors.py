"""The one exception type for mistakes a user can fix; the CLI prints it as one line, exit 2."""


class EdlmError(Exception):
    """A user-facing error: bad path, bad flag, bad input. Message says what to change."""
