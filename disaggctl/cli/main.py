"""The `disaggctl` command line: parses, calls the module that owns the command, renders.

Heavy imports (torch, aiohttp, paramiko) stay inside the commands that need them, so that
`disaggctl status` and `--help` start fast.
"""

from __future__ import annotations

import sys

import typer

from disaggctl import __version__
from disaggctl.cli.bench import bench
from disaggctl.cli.launch import down, logs, plan, status, up

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Run prefill/decode-disaggregated LLM serving from one topology file.",
)

app.command(help="Validate a topology and print its process plan (dry run).")(plan)
app.command(
    help="Launch every process of a topology; wait for health; proxy last; return, leaving a keeper that "
    "restarts processes that die by their `restart` policy (-d is the same). Idempotent."
)(up)
app.command(help="Show every process of the running deployment.")(status)
app.command(help="Show (or follow) the logs of the deployment's processes.")(logs)
app.command(help="Stop the keeper, then every process of the deployment: SIGTERM, wait, SIGKILL.")(down)
app.command(help="Serving benchmark against the deployment's proxy or any --url.")(bench)


SERVE_ROLES = ("colocated", "prefill", "decode", "encoder", "proxy")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="The entry a launched process runs: serve ROLE [options] (see docs/architecture.md).",
)
def serve(ctx: typer.Context, role: str = typer.Argument(..., help="|".join(SERVE_ROLES))) -> None:
    argv = list(ctx.args)
    if role == "proxy":
        from disaggctl.proxy.server import main as proxy_main

        raise typer.Exit(proxy_main(argv))
    if role in ("colocated", "prefill", "decode"):
        from disaggctl.runtime.server import main as runtime_main

        raise typer.Exit(runtime_main(role, argv))
    if role == "encoder":
        from disaggctl.runtime.vision.encoder_server import main as encoder_main

        raise typer.Exit(encoder_main(argv))
    typer.echo(f"error: unknown role {role!r}; expected one of {', '.join(SERVE_ROLES)}", err=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"disaggctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
