"""Read a topology YAML file; every problem is reported as `FILE:LINE: field.path: message`.

PyYAML's node graph keeps the line of every key, so pydantic's error locations (and the planner's)
can be turned back into lines of the file the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from disaggctl.topology.schema import Topology


@dataclass(frozen=True)
class Issue:
    path: tuple  # field path: ("prefill", "replicas"), ("hosts", 0, "gpus")
    message: str


class TopologyError(Exception):
    """One or more problems in a topology; str() is one `FILE:LINE: field.path: message` line each."""

    def __init__(self, source: str, issues: list[Issue], lines: dict[tuple, int] | None = None):
        self.source = source
        self.issues = list(issues)
        self.lines = dict(lines or {})
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(self.format(i) for i in self.issues)

    def format(self, issue: Issue) -> str:
        line = line_of(self.lines, issue.path)
        where = f"{self.source}:{line}" if line else self.source
        field = format_path(issue.path)
        return f"{where}: {field}: {issue.message}" if field else f"{where}: {issue.message}"


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    """Line of the longest prefix of `path` that the file spells out (a missing field: its parent)."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _record_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], issues: list[Issue]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = (*path, key)
            if key in seen:
                lines[sub] = key_node.start_mark.line + 1
                issues.append(Issue(sub, "duplicate key (YAML would silently keep only the last one)"))
            seen.add(key)
            lines.setdefault(sub, key_node.start_mark.line + 1)
            _record_lines(value_node, sub, lines, issues)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault((*path, i), item.start_mark.line + 1)
            _record_lines(item, (*path, i), lines, issues)


def parse(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """YAML text -> (plain data, field path -> line). Raises TopologyError on bad YAML."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = {(): mark.line + 1} if mark else {}
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise TopologyError(source, [Issue((), f"YAML syntax error: {what}")], line) from None
    except yaml.YAMLError as e:
        raise TopologyError(source, [Issue((), f"YAML error: {e}")]) from None
    lines: dict[tuple, int] = {}
    issues: list[Issue] = []
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _record_lines(node, (), lines, issues)
    if issues:
        raise TopologyError(source, issues, lines)
    return data, lines


def _message(err: dict) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if (
        kind not in ("value_error", "assertion_error")
        and "input" in err
        and not isinstance(err["input"], dict)
    ):
        msg += f" (got {err['input']!r})"
    return msg


def _clean_loc(loc: tuple, data: Any) -> tuple:
    """Keep the parts of pydantic's error location that are places in the file (or a missing key);
    drop union-branch tags such as `bool` or `literal['auto']` that sit below a scalar."""
    out: list = []
    node = data
    for part in loc:
        if isinstance(node, dict):
            out.append(part)
            node = node.get(part) if part in node else None
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        else:
            break
    return tuple(out)


def validate(data: Any, source: str, lines: dict[tuple, int]) -> Topology:
    if not isinstance(data, dict):
        raise TopologyError(
            source, [Issue((), "the topology must be a YAML mapping (name:, model:, hosts:, ...)")], lines
        )
    try:
        topo = Topology.model_validate(data)
    except ValidationError as e:
        by_path: dict[tuple, list[str]] = {}
        for err in e.errors():
            msgs = by_path.setdefault(_clean_loc(tuple(err["loc"]), data), [])
            if _message(err) not in msgs:
                msgs.append(_message(err))
        # a union field fails once per branch: one line that lists what each branch wanted
        issues = [Issue(path, "; or ".join(msgs)) for path, msgs in by_path.items()]
        raise TopologyError(source, issues, lines) from None
    topo._lines = lines
    return topo


def load_topology(path: str | Path) -> Topology:
    """Read and validate one topology file. Raises TopologyError (str(): one line per problem)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(source, [Issue((), "no such file")]) from None
    except IsADirectoryError:
        raise TopologyError(source, [Issue((), "is a directory, not a topology file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(source, [Issue((), f"cannot read: {e}")]) from None
    data, lines = parse(text, source)
    return validate(data, source, lines)
