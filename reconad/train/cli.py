"""recon-train: synthetic sample data, fitting, evaluation and import of official UniAD checkpoints."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
