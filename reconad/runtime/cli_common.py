"""What the three ``recon-*`` Typer apps share: help as written, ``--version``, choices with shell completion.

- Help text is plain (``rich_markup_mode=None``): Rich markup would read ``[default: 0.01]`` or
  ``mqtt://[user@]host`` as style tags and drop them, so help is printed as written, the same with or
  without Rich, wrapped at up to 120 columns (click's formatter; ``COLUMNS`` narrows it).
- ``--version`` on every app prints ``<app> <version>`` (the installed distribution's version,
  ``reconad.__version__`` in a checkout that is not installed) and exits 0.
- A fixed-choice option is an ``Enum`` made by ``choices``: Typer turns it into a click ``Choice``,
  so shells complete it (``--install-completion``) and a wrong value is refused in one sentence
  naming the choices, exit 2, no traceback.
"""

import enum
import importlib.metadata
from collections.abc import Iterable
from typing import Annotated, Any, Optional

import typer

HELP_WIDTH = 120


def reconad_version() -> str:
    """The installed reconad distribution's version; ``reconad.__version__`` when it is not installed."""
    try:
        return importlib.metadata.version("reconad")
    except importlib.metadata.PackageNotFoundError:
        import reconad

        return reconad.__version__


def make_app(name: str, help: str) -> typer.Typer:
    """A Typer app with the project's conventions: plain help, ``--version``, shell completion.

    Args:
        name: the console script (``recon-inspect``), printed by ``--version``.
        help: the app's one-paragraph description (``--help`` without a command).
    """
    app = typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        rich_markup_mode=None,
        context_settings={"max_content_width": HELP_WIDTH},
    )

    def print_version(value: bool) -> None:
        if value:
            typer.echo(f"{name} {reconad_version()}")
            raise typer.Exit(0)

    @app.callback()
    def main(
        version: Annotated[
            Optional[bool],
            typer.Option("--version", is_eager=True, callback=print_version, help="Print the version and exit."),
        ] = None,
    ) -> None:
        pass

    main.__doc__ = help
    return app


def choices(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A ``str`` Enum whose values are exactly ``values`` (the spellings the code accepts), for a Typer option.

    The CLI passes ``member.value`` (``value_of``) on to library code, which checks the value again.
    """
    return enum.Enum(name, [(value, value) for value in values], type=str)  # type: ignore[return-value]


def value_of(member: Any) -> Any:
    """An Enum option's plain value (None stays None): what library code and config records take."""
    return member.value if isinstance(member, enum.Enum) else member
