"""One exception type for user-facing mistakes.

Its message is a single line that names the fix, so the command line can print it without a traceback and a
notebook user sees at once what to change.
"""


class MipoError(ValueError):
    """Bad input or an unusable setting, with a one-line message that says how to fix it."""
