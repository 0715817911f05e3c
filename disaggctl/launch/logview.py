"""Log lines of several processes on one stream: `name | line` prefixes, a stable colour per process,
and a follow mode that merges the files by arrival."""

from __future__ import annotations

import os
import queue
import threading
import zlib
from collections.abc import Iterator
from typing import Any, TextIO

# Foreground colours that read on dark and light terminals; red stays free for disaggctl's own errors.
_COLOURS = ("36", "32", "33", "35", "34", "96", "92", "93", "95", "94")
_RESET = "\x1b[0m"


def colour_of(name: str) -> str:
    """The same colour for the same process name in every run (crc32, not Python's salted hash)."""
    return _COLOURS[zlib.crc32(name.encode()) % len(_COLOURS)]


def want_colour(no_color: bool, stream: TextIO) -> bool:
    if no_color or os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Prefixer:
    def __init__(self, names: list[str], colour: bool):
        self.width = max((len(n) for n in names), default=0)
        self.colour = colour

    def __call__(self, name: str, line: str) -> str:
        head = f"{name:<{self.width}} |"
        if self.colour:
            head = f"\x1b[{colour_of(name)}m{head}{_RESET}"
        return f"{head} {line}"


def select(records: list, which: str | None) -> list:
    """The records named `which` (a process name or a role), all of them when None; ValueError if none."""
    if not which:
        return list(records)
    chosen = [r for r in records if r.name == which] or [r for r in records if r.role == which]
    if not chosen:
        names = ", ".join(r.name for r in records)
        roles = ", ".join(sorted({r.role for r in records if r.role}))
        raise ValueError(f"no process or role {which!r} (processes: {names}; roles: {roles})")
    return chosen


def follow_all(sources: list[tuple[Any, Any]], tail: int, stop: threading.Event) -> Iterator[tuple[str, str]]:
    """(name, line) from every (record, backend) pair as lines arrive, until `stop` is set. One reader
    thread per log; a reader that fails reports its error as a line of its own and ends."""
    lines: queue.Queue[tuple[str, str]] = queue.Queue(maxsize=10000)

    def read(rec: Any, backend: Any) -> None:
        try:
            for line in backend.follow_log(rec, tail=tail, stop=stop):
                lines.put((rec.name, line))
        except Exception as e:
            lines.put((rec.name, f"(log follow ended: {e})"))

    for rec, backend in sources:
        threading.Thread(target=read, args=(rec, backend), daemon=True).start()
    while not stop.is_set():
        try:
            yield lines.get(timeout=0.2)
        except queue.Empty:
            continue
