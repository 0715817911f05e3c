"""Placeholder until the launcher lands: the owner replaces this module."""

import typer


def _missing() -> None:
    typer.echo("error: this command is not built yet", err=True)
    raise typer.Exit(1)


def plan() -> None:
    _missing()


def up() -> None:
    _missing()


def status() -> None:
    _missing()


def logs() -> None:
    _missing()


def down() -> None:
    _missing()
