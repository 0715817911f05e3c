"""The command-line options of pinned SGLang / sglang_router releases, and a check of rendered commands.

The snapshots in disaggctl/data (`sglang-args-<version>.json`, `sglang-router-args-<version>.json`) are
written by scripts/extract_sglang_args.py from the releases' wheels: every option of a module with its
argparse nargs (0 for a switch) and, where it is a literal, its default. `check_argv` parses a
command line the way argparse would against one of them, without SGLang installed, so a renamed or
removed flag fails at `disaggctl plan` (and in the tests) instead of at the last step of `up`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

# The release `engine: sglang` renders for unless the topology says `sglang.version`. Moving it means
# re-running scripts/extract_sglang_args.py for the new release and reading the diff.
PINNED_SGLANG = "0.5.23"
PINNED_ROUTER = "0.3.2"

VERSION_PATTERN = r"^\d+\.\d+\.\d+(\.post\d+)?$"
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def version_key(version: str) -> tuple[int, ...]:
    """'0.4.6.post3' -> (0, 4, 6, 3); a .postN release sorts after its base release."""
    return tuple(int(part.removeprefix("post")) for part in version.split("."))


@cache
def snapshot(package: str, version: str) -> dict[str, dict[str, dict[str, Any]]] | None:
    """Module -> option -> {"nargs", "default"?} for `package` ("sglang" or "sglang-router") at
    `version`, or None when no snapshot of that release ships with disaggctl."""
    stem = "sglang-args" if package == "sglang" else "sglang-router-args"
    node = resources.files("disaggctl").joinpath("data", f"{stem}-{version}.json")
    if not node.is_file():
        return None
    return json.loads(node.read_text(encoding="utf-8"))["commands"]


def options_for(module: str, sglang_version: str) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """(release named, options) of `module` as the deployment runs it: the router is its own package at
    its pinned release, the rest comes with SGLang at `sglang_version`. None: no snapshot to check with."""
    top = module.split(".")[0]
    if top == "sglang_router":
        package, version = "sglang-router", PINNED_ROUTER
    elif top == "sglang":
        package, version = "sglang", sglang_version
    else:
        return None
    commands = snapshot(package, version)
    if commands is None:
        return None
    label = f"{'sglang_router' if package == 'sglang-router' else 'SGLang'} {version}"
    return (label, commands[module]) if module in commands else (label, {})


def _is_value(token: str) -> bool:
    # argparse reads "-1" as a value, not an option, as long as no option looks like a number
    return not token.startswith("-") or bool(_NEGATIVE_NUMBER.match(token))


def check_argv(args: list[str], options: dict[str, dict[str, Any]]) -> list[str]:
    """Problems argparse would have with `args` (what follows `python -m MODULE`): options it does not
    know, a switch given a value, an option without the values it needs, a stray value. Abbreviated
    options count as unknown: argparse accepts them, but a later release may make them ambiguous."""
    problems: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if _is_value(token):
            problems.append(f"{token!r} is not an option and follows no option that takes it")
            i += 1
            continue
        name, eq, inline = token.partition("=")
        spec = options.get(name)
        if spec is None:
            problems.append(f"{name} is not an option")
            i += 1
            while i < len(args) and _is_value(args[i]):
                i += 1
            continue
        nargs = spec["nargs"]
        i += 1
        values = []
        if eq:
            values.append(inline)
        while i < len(args) and _is_value(args[i]) and not (eq or _full(nargs, values)):
            values.append(args[i])
            i += 1
        if nargs == 0 and values:
            problems.append(f"{name} takes no value, got {values[0]!r}")
        elif isinstance(nargs, int) and nargs > 0 and len(values) != nargs:
            problems.append(f"{name} takes {nargs} value{'s' if nargs > 1 else ''}, got {len(values)}")
        elif nargs == "+" and not values:
            problems.append(f"{name} takes one or more values, got none")
    return problems


def _full(nargs: int | str, values: list[str]) -> bool:
    if isinstance(nargs, int):
        return len(values) >= nargs
    return nargs == "?" and len(values) >= 1


def check_command(argv: list[str], sglang_version: str) -> tuple[str, list[str]] | None:
    """(release named, problems) for a rendered `python -m MODULE ...` command line, or None when it
    runs no SGLang module or no snapshot of that release ships with disaggctl."""
    if len(argv) < 3 or argv[1] != "-m":
        return None
    found = options_for(argv[2], sglang_version)
    if found is None:
        return None
    label, options = found
    if not options:
        return label, [f"{label} has no module {argv[2]}"]
    return label, check_argv([str(a) for a in argv[3:]], options)
