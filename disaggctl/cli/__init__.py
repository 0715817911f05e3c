"""The `disaggctl` command line: every typer command, parsing options and rendering what the control
plane's libraries return (launch/ starts and stops, bench/ measures, topology/ plans).

main.py: the app and `serve`; launch.py: plan, up, status, logs, down; bench.py: bench.
"""

from disaggctl.cli.main import app, main

__all__ = ["app", "main"]
