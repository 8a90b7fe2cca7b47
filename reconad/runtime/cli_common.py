"""What the three ``recon-*`` Typer apps share: help as written, ``--version``, choices with shell completion.

- Help text is plain (``rich_markup_mode=None``): Rich markup would read ``[default: 0.01]`` or
  ``mqtt://[user@]host`` as style tags and drop them, so help is printed as written, the same with or
  without Rich, wrapped at up to 120 columns (click's formatter; ``COLUMNS`` narrows it).
- ``--version`` on every app prints ``<app> <version>`` (the installed distribution's version,
  ``reconad.__version__`` in a checkout that is not installed) and exits 0.
- A fixed-choice option is an ``Enum`` made by ``choices``: Typer turns it into a click ``Choice``,
  so shells complete it (``--install-completion``) and a wrong value is refused in one sentence
  naming the option and the choices (``Error: Invalid value for '--preset': 'lite0' is not one of
  'mvtec-512', ...``), after click's usage lines as every other usage error, exit 2, no traceback.
- Every command is a ``ReconadCommand``: arguments read as click always wrote them (``DATA``,
  ``[FOLDERS]...``; Typer 0.29 writes ``{data}``), value types as one word (``<path>``, ``<int>``;
  Typer 0.29 writes ``<list[Path]>``, ``<int range>``), and a bad value's sentence without the
  pydantic prefix that Typer 0.29 lets through (``Value error, ...``).
"""

import enum
import importlib.metadata
import re
from collections.abc import Iterable
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

HELP_WIDTH = 120


def reconad_version() -> str:
    """The installed reconad distribution's version; ``reconad.__version__`` when it is not installed."""
    try:
        return importlib.metadata.version("reconad")
    except importlib.metadata.PackageNotFoundError:
        import reconad

        return reconad.__version__


# Typer 0.29's type labels that read badly, and what they become (a no-op for the labels of older Typers).
_LIST_LABEL = re.compile(r"<list\[([^\]]+)\]>")
_RANGE_LABEL = re.compile(r"<(int|float) range>")
# How pydantic (under Typer 0.29) words a ValueError raised by a validator: "Value error, <the sentence>".
_PYDANTIC_VALUE_ERROR = "Value error, "


def readable_label(text: str) -> str:
    """A help record's option or argument column with one-word types: ``<list[Path]>`` -> ``<path>``,
    ``<list[str]>`` -> ``<str>`` (an argument's name ends in ``...``, a repeatable option says so in its
    help), ``<int range>`` -> ``<int>`` (the range is stated beside the help)."""
    text = _LIST_LABEL.sub(lambda match: f"<{match.group(1).lower()}>", text)
    return _RANGE_LABEL.sub(r"<\1>", text)


class ReconadCommand(TyperCommand):
    """A Typer command whose usage line, help columns and bad-value sentences read as click's always did.

    Arguments are named in capitals (``DATA``, also in "Missing argument 'DATA'."), required ones bare
    and optional ones in brackets in the usage line, ``...`` after those taking several values; a
    ``click.BadParameter`` sentence loses pydantic's ``Value error, `` prefix, so a wrong choice reads
    ``Invalid value for '--preset': 'lite0' is not one of 'mvtec-512', ...``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces += param.get_usage_pieces(ctx)
                continue
            name = param.metavar or param.name.upper()
            name = name if param.required else f"[{name}]"
            pieces.append(f"{name}..." if param.nargs != 1 else name)
        return pieces

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            label, text = record
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                kind = label.split(" ", 1)[1] if label.startswith(f"{name} ") else ""
                name = f"{name}..." if param.nargs != 1 and not name.endswith("...") else name
                arguments.append((f"{name} {readable_label(kind)}".rstrip(), text))
            elif param.param_type_name == "option":
                options.append((readable_label(label), text))
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as error:
            if error.message.startswith(_PYDANTIC_VALUE_ERROR):
                error.message = error.message[len(_PYDANTIC_VALUE_ERROR):]
            raise


class _App(typer.Typer):
    """``typer.Typer`` whose commands are ``ReconadCommand``s unless a command names its own class."""

    def command(self, name: Optional[str] = None, *, cls: Optional[type[TyperCommand]] = None, **kwargs: Any):
        return super().command(name, cls=cls or ReconadCommand, **kwargs)


def make_app(name: str, help: str) -> typer.Typer:
    """A Typer app with the project's conventions: plain help, ``--version``, shell completion, its commands
    ``ReconadCommand``s (a command's own ``cls`` should subclass it).

    Args:
        name: the console script (``recon-inspect``), printed by ``--version``.
        help: the app's one-paragraph description (``--help`` without a command).
    """
    app = _App(
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
