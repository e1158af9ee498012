"""The one exception type for bad input: a message that names the problem and the fix.

The CLI prints it as a single `error: ...` line and exits with code 2; library callers catch it like any
other exception. Bugs stay ordinary exceptions with tracebacks.
"""


class LLMLabError(Exception):
    """Bad input or a bad state a user can fix (a wrong path, an empty corpus, a mismatched checkpoint)."""
