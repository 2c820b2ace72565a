"""coordinator command line (DESIGN.md §2)."""

from __future__ import annotations

import typer

app = typer.Typer(help="coordinator: the mesh VPN control plane", no_args_is_help=True, add_completion=False)


@app.command()
def version() -> None:
    """Print the version."""
    from importlib.metadata import version as v

    typer.echo(v("meshvpn"))


def main() -> None:
    app()
