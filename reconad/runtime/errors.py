"""The one exception type that library code raises for bad input; only CLIs turn it into exit codes.

Its message is a single sentence meant for an operator: what is wrong and, where possible, what to do.
"""

from typing import NoReturn


class ReconadError(Exception):
    """A user-facing failure (bad file, mismatched artifact, missing dependency).

    CLIs print ``str(error)`` on one line without a traceback and exit with ``exit_code``.
    """

    exit_code = 2


class BackendUnavailableError(ReconadError):
    """A backend that cannot be reached right now (a Triton server restarting): the loop retries with backoff."""

    exit_code = 3


def exit_with(error: BaseException, prefix: str = "") -> NoReturn:
    """For CLI commands only: print ``error`` as one line on stderr, exit with its code, no traceback."""
    import typer

    typer.echo(f"{prefix}{error}", err=True)
    raise typer.Exit(getattr(error, "exit_code", ReconadError.exit_code)) from None
