"""Placeholder until the benchmark lands: the owner replaces this module."""

import typer


def bench() -> None:
    typer.echo("error: this command is not built yet", err=True)
    raise typer.Exit(1)
