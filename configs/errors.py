"""The one exception type for mistakes a user can fix: entry points print it as one line and exit 2."""


class UserError(Exception):
    """A bad path, key, value or file; the message says what is wrong and how to fix it."""
