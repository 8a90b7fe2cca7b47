"""The one exception type that library code raises for bad input; only CLIs turn it into exit codes.

Its message is a single sentence meant for an operator: what is wrong and, where possible, what to do.
"""


class ReconadError(Exception):
    """A user-facing failure (bad file, mismatched artifact, missing dependency).

    CLIs print ``str(error)`` on one line without a traceback and exit with ``exit_code``.
    """

    exit_code = 2
