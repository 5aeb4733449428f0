"""How the installer fails: `UsageError` for bad flags (nothing changed yet, exit 2) and
`StepFailed` for a step that could not finish (with a hint saying what to check).

A leaf module, so the runner, the hal0 session and the file helpers can raise them.
"""


class StepFailed(Exception):
    """A step could not finish. `hint` says what to check; nothing is left half-written."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class UsageError(Exception):
    """Bad flags or values (exit code 2); raised before anything is changed."""
