"""Snapshot the command-line options of an SGLang release (and of sglang_router) for disaggctl's checks.

    python scripts/extract_sglang_args.py --sglang 0.5.23 --router 0.3.2

writes disaggctl/data/sglang-args-0.5.23.json (`python -m sglang.launch_server`, and the release's
`sglang.srt.disaggregation.mini_lb` when it still has a working one) and
disaggctl/data/sglang-router-args-0.3.2.json (`python -m sglang_router.launch_router`). Each option
is stored with its argparse nargs (0 for a switch) and, when it is a literal, its default;
disaggctl/topology/sglang_args.py checks rendered command lines against them.

The wheels are fetched with `pip download --no-deps` (or given with --sglang-wheel / --router-wheel)
and read without being installed: installing SGLang pulls CUDA torch, and the options are declared
statically (argparse `add_argument` calls in older releases, `A[type, Arg(...)]` fields of the
`arg_groups/fields` namespaces in newer ones; both are read from the syntax tree). A maintainer
re-runs this when the pinned release moves (PINNED_SGLANG in disaggctl/topology/sglang_args.py) and
checks the diff. With --installed the options are taken from the argparse parser of the SGLang /
sglang_router installed in this interpreter instead, which is exact.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "disaggctl" / "data"

LAUNCH_SERVER = "sglang.launch_server"
MINI_LB = "sglang.srt.disaggregation.mini_lb"
ROUTER = "sglang_router.launch_router"

UNSET = object()
# argparse actions that take no value; anything else takes one unless nargs says otherwise
SWITCH_ACTIONS = {"store_true", "store_false", "store_const", "append_const", "count", "help", "version"}
# options every launch_server release has: an extraction that misses one has misread the source
SANITY = {
    LAUNCH_SERVER: ["--model-path", "--port", "--host", "--tp-size", "--disaggregation-mode"],
    ROUTER: ["--pd-disaggregation", "--prefill", "--decode", "--policy", "--host", "--port"],
    MINI_LB: ["--prefill", "--decode", "--host", "--port"],
}


# -- reading the syntax tree ----------------------------------------------------------------------------


def _literal(node: ast.AST | None) -> tuple[bool, object]:
    if node is None:
        return False, None
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None
    return (True, value) if isinstance(value, str | int | float | bool | type(None)) else (False, None)


def _option_name(node: ast.AST) -> str | None:
    """'--x', or f'--{prefix}x' with the router's prefix empty (launch_router passes no prefix)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif (
                isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.value.id == "prefix"
            ):
                continue
            else:
                return None
        return "".join(parts)
    return None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


class _Actions:
    """The nargs a custom argparse.Action subclass defaults to, read from its __init__ signature."""

    def __init__(self, trees: list[ast.Module]) -> None:
        self.nargs: dict[str, object] = {}
        for tree in trees:
            for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
                init = next(
                    (f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None
                )
                if init is None:
                    self.nargs[cls.name] = None
                    continue
                args = init.args
                defaults = (
                    dict(zip([a.arg for a in args.args][-len(args.defaults) :], args.defaults, strict=False))
                    if args.defaults
                    else {}
                )
                defaults.update(
                    {
                        a.arg: d
                        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                        if d is not None
                    }
                )
                ok, value = _literal(defaults.get("nargs"))
                self.nargs[cls.name] = value if ok else None

    def switch(self, action: ast.AST, nargs: object = UNSET) -> tuple[bool, bool]:
        """(takes no value, adds --no-X too) for `action=...`, with the call's `nargs` if it gives one."""
        name = _dotted(action)
        ok, text = _literal(action)
        if ok and isinstance(text, str):
            return (text in SWITCH_ACTIONS if nargs is UNSET else nargs == 0), False
        if name.endswith("BooleanOptionalAction"):
            return True, True
        short = name.rsplit(".", 1)[-1]
        if short not in self.nargs:
            raise SystemExit(f"unknown argparse action {name!r}: teach extract_sglang_args.py about it")
        return (self.nargs[short] if nargs is UNSET else nargs) == 0, False


def _nargs_value(node: ast.AST | None) -> object:
    ok, value = _literal(node)
    return value if ok else None


def _add(options: dict, names: list[str], nargs: object, default: tuple[bool, object], negate: bool) -> None:
    entry: dict = {"nargs": nargs}
    if default[0]:
        entry["default"] = default[1]
    for name in names:
        if name.startswith("--"):
            options[name] = entry
            if negate:
                options["--no-" + name[2:]] = {"nargs": 0}


def add_argument_calls(trees: list[ast.Module], actions: _Actions) -> dict:
    """Options of every `<parser>.add_argument("--x", ...)` call."""
    options: dict = {}
    for tree in trees:
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if not (isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"):
                continue
            names = [n for n in map(_option_name, call.args) if n]
            if not names:
                continue
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            nargs = _nargs_value(kw["nargs"]) if "nargs" in kw else UNSET
            negate = False
            if "action" in kw:
                switch, negate = actions.switch(kw["action"], nargs)
                nargs = 0 if switch else nargs
            if nargs is UNSET or nargs is None:
                nargs = 1
            _add(options, names, nargs, _literal(kw.get("default")), negate)
    return options


def _subscript_parts(node: ast.Subscript) -> list[ast.AST]:
    s = node.slice
    return list(s.elts) if isinstance(s, ast.Tuple) else [s]


def _strip_optional(node: ast.AST) -> ast.AST:
    if isinstance(node, ast.Subscript) and _dotted(node.value).rsplit(".", 1)[-1] in ("Optional",):
        return _subscript_parts(node)[0]
    if isinstance(node, ast.Subscript) and _dotted(node.value).rsplit(".", 1)[-1] == "Union":
        rest = [p for p in _subscript_parts(node) if not (isinstance(p, ast.Constant) and p.value is None)]
        return rest[0] if len(rest) == 1 else node
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [s for s in (node.left, node.right) if not (isinstance(s, ast.Constant) and s.value is None)]
        return sides[0] if len(sides) == 1 else node
    return node


def annotated_fields(trees: list[ast.Module], actions: _Actions) -> dict:
    """Options of the `name: A[type, "help" | Arg(...)] = default` fields SGLang turns into flags
    (sglang.srt.arg_groups.arg_utils.add_cli_args_from_dataclass: the same rules, read statically)."""
    options: dict = {}
    for tree in trees:
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                ann = stmt.annotation
                if not (isinstance(ann, ast.Subscript) and _dotted(ann.value) in ("A", "Annotated")):
                    continue
                parts = _subscript_parts(ann)
                kind, meta = parts[0], None
                for extra in parts[1:]:
                    if isinstance(extra, ast.Call) and _dotted(extra.func) == "Arg":
                        meta = {k.arg: k.value for k in extra.keywords if k.arg}
                        break
                    if not isinstance(extra, ast.Call):  # a help string (plain, concatenated or an f-string)
                        meta = {}
                        break
                if meta is None or _literal(meta.get("no_cli"))[1] is True:
                    continue
                field = stmt.target.id
                name = _literal(meta.get("cli_name"))[1] or "--" + field.replace("_", "-")
                ok, aliases = (
                    (True, [a.value for a in meta["aliases"].elts])
                    if isinstance(meta.get("aliases"), ast.List)
                    else (False, [])
                )
                names = [name, *aliases]
                default = _literal(stmt.value) if stmt.value is not None else (False, None)
                nargs: object = _nargs_value(meta["nargs"]) if "nargs" in meta else UNSET
                action_kwargs = meta.get("action_kwargs")
                if isinstance(action_kwargs, ast.Dict):
                    for k, v in zip(action_kwargs.keys, action_kwargs.values, strict=True):
                        if _literal(k)[1] == "nargs":
                            nargs = _nargs_value(v)
                if "action" in meta:
                    switch, negate = actions.switch(meta["action"], nargs)
                    _add(
                        options,
                        names,
                        0 if switch else (1 if nargs in (UNSET, None) else nargs),
                        default,
                        negate,
                    )
                    continue
                if nargs is UNSET:
                    nargs = None
                inner = _strip_optional(kind)
                head = _dotted(inner.value).rsplit(".", 1)[-1] if isinstance(inner, ast.Subscript) else ""
                if head == "Literal":
                    _add(options, names, 1, default, False)
                elif head in ("List", "list") and "type_parser" not in meta:
                    _add(options, names, nargs or "+", default, False)
                elif isinstance(inner, ast.Name) and inner.id == "bool":
                    _add(options, names, 0, default, False)
                else:
                    _add(options, names, nargs if nargs is not None else 1, default, False)
    return options


# -- wheels ---------------------------------------------------------------------------------------------


def _download(package: str, version: str, into: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(into),
            f"{package}=={version}",
        ],
        check=True,
    )
    stem = package.replace("-", "_")
    found = sorted(into.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download left no {stem}-{version} wheel in {into}")
    return found[0]


def _trees(wheel: zipfile.ZipFile, names: list[str]) -> list[ast.Module]:
    return [ast.parse(wheel.read(n).decode("utf-8"), filename=n) for n in names]


def sglang_commands(path: Path) -> dict:
    with zipfile.ZipFile(path) as wheel:
        files = set(wheel.namelist())
        server = ["sglang/srt/server_args.py"]
        server += sorted(
            n for n in files if n.startswith("sglang/srt/arg_groups/fields/") and n.endswith(".py")
        )
        action_files = [n for n in ("sglang/srt/arg_groups/argparse_actions.py",) if n in files]
        trees = _trees(wheel, server)
        actions = _Actions(trees + _trees(wheel, action_files))
        commands = {LAUNCH_SERVER: {**annotated_fields(trees, actions), **add_argument_calls(trees, actions)}}
        # mini_lb: its own argparse (up to 0.4.6.post2), launch_lb's (it delegates there until 0.5.1),
        # then a module that only raises "relocated to sglang_router" (0.5.2), then nothing
        lb = "sglang/srt/disaggregation/mini_lb.py"
        if lb in files:
            text = wheel.read(lb).decode("utf-8")
            source = "sglang/srt/disaggregation/launch_lb.py" if "launch_lb" in text else lb
            lb_trees = _trees(wheel, [source])
            found = add_argument_calls(lb_trees, _Actions(lb_trees))
            if found:
                commands[MINI_LB] = found
    return commands


def router_commands(path: Path) -> dict:
    with zipfile.ZipFile(path) as wheel:
        trees = _trees(wheel, ["sglang_router/router_args.py"])
        return {ROUTER: add_argument_calls(trees, _Actions(trees))}


def installed_commands(kind: str) -> dict:
    """Exact options, from the parsers of the SGLang / sglang_router installed here."""
    parser = argparse.ArgumentParser(add_help=False)
    if kind == "router":
        from sglang_router.router_args import RouterArgs

        RouterArgs.add_cli_args(parser, use_router_prefix=False)
        module = ROUTER
    else:
        from sglang.srt.server_args import ServerArgs

        ServerArgs.add_cli_args(parser)
        module = LAUNCH_SERVER
    options: dict = {}
    for action in parser._actions:
        nargs = 0 if action.nargs == 0 else (1 if action.nargs is None else action.nargs)
        entry: dict = {"nargs": nargs}
        if isinstance(action.default, str | int | float | bool | type(None)):
            entry["default"] = action.default
        for name in action.option_strings:
            if name.startswith("--"):
                options[name] = entry
    return {module: options}


def write(path: Path, package: str, version: str, commands: dict, how: str) -> None:
    for module, options in commands.items():
        missing = [o for o in SANITY.get(module, []) if o not in options]
        if missing:
            raise SystemExit(
                f"{package} {version} {module}: extraction misses {missing}; the source changed shape"
            )
    lines = [
        "{",
        f'  "package": {json.dumps(package)},',
        f'  "version": {json.dumps(version)},',
        f'  "generated_by": "scripts/extract_sglang_args.py ({how})",',
        '  "commands": {',
    ]
    for i, (module, options) in enumerate(sorted(commands.items())):
        lines.append(f"    {json.dumps(module)}: {{")
        items = sorted(options.items())
        for j, (name, entry) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            lines.append(f"      {json.dumps(name)}: {json.dumps(entry, sort_keys=True)}{comma}")
        lines.append("    }" + ("," if i < len(commands) - 1 else ""))
    lines += ["  }", "}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(
        f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
        + ", ".join(f"{m} {len(o)} options" for m, o in sorted(commands.items()))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sglang", metavar="VERSION", help="SGLang release to snapshot")
    ap.add_argument("--router", metavar="VERSION", help="sglang-router release to snapshot")
    ap.add_argument("--sglang-wheel", type=Path, help="use this wheel instead of downloading one")
    ap.add_argument("--router-wheel", type=Path, help="use this wheel instead of downloading one")
    ap.add_argument("--installed", action="store_true", help="read the parsers of the installed packages")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not (args.sglang or args.router):
        ap.error("give --sglang VERSION and/or --router VERSION")
    with tempfile.TemporaryDirectory() as tmp:
        if args.sglang:
            if args.installed:
                commands, how = installed_commands("sglang"), "installed parser"
            else:
                wheel = args.sglang_wheel or _download("sglang", args.sglang, Path(tmp))
                commands, how = sglang_commands(wheel), f"read from {wheel.name}"
            write(args.out / f"sglang-args-{args.sglang}.json", "sglang", args.sglang, commands, how)
        if args.router:
            if args.installed:
                commands, how = installed_commands("router"), "installed parser"
            else:
                wheel = args.router_wheel or _download("sglang-router", args.router, Path(tmp))
                commands, how = router_commands(wheel), f"read from {wheel.name}"
            write(
                args.out / f"sglang-router-args-{args.router}.json",
                "sglang-router",
                args.router,
                commands,
                how,
            )


if __name__ == "__main__":
    main()
