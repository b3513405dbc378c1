"""The one exception type a user sees.

Anything that is the user's fault (a bad flag, a missing file, a config value
that cannot work) raises `UserError` with a single line that names the problem
and the fix. The CLI prints it as `sdmoe: error: ...` and exits with code 2;
library callers get an ordinary exception (a `ValueError`) they can catch.
"""


class UserError(ValueError):
    """A one-line, actionable error caused by the user's input."""

    def __init__(self, message: str):
        # Errors are one line by contract: fold any newline a caller let slip in.
        super().__init__(" ".join(str(message).split()))
