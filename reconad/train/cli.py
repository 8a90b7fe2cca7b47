"""recon-train: synthetic sample data, fitting, evaluation and import of official UniAD checkpoints."""

from pathlib import Path
from typing import Annotated

import typer

from reconad.runtime.errors import ReconadError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])


@app.callback()
def main() -> None:
    """Train UniAD on defect-free images of all products at once, evaluate it, import official checkpoints."""


@app.command("import-uniad")
def import_uniad_command(
    checkpoint: Annotated[Path, typer.Argument(help="Official UniAD ckpt.pth.tar (github zhiyuanyou/UniAD).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the reconad checkpoint.")],
) -> None:
    """Convert an official UniAD checkpoint (MVTec config, EfficientNet-B4 at 224 px) into preset uniad-224."""
    from reconad.model import save_checkpoint
    from reconad.model.uniad_import import import_uniad

    try:
        detector = import_uniad(checkpoint)
        save_checkpoint(detector, out, **detector.provenance)
    except ReconadError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    typer.echo(f"wrote {out} (preset {detector.config.preset})")
