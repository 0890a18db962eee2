"""A small YAML emitter that keeps comments: PyYAML can read them but never writes them.

It handles what suggest-config produces: nested mappings with string keys, scalars, lists of
scalars (written in flow style, `[0.9, 0.98]`), lists of mappings, and multi-line strings
(literal blocks, `|-`). Each scalar is spelled by PyYAML itself (`1.0e-05`, `'null'`, quoting),
so `yaml.safe_load` reads back exactly the data that went in; a test holds it to that.

Comments are keyed by the path of mapping keys, e.g. `("gradient_clipping", "max_grad_norm")`,
and written at the end of that key's line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

Path = tuple[str, ...]
INDENT = 2


def emit(data: Mapping[str, Any], comments: Mapping[Path, str] | None = None,
         header: Sequence[str] = ()) -> str:
    """`data` as YAML text, with `# header` lines first and end-of-line comments."""
    lines = [_comment_line(h) for h in header]
    _mapping(data, (), 0, comments or {}, lines)
    return "\n".join(lines) + "\n"


FLOW_WIDTH = 72  # a list of scalars longer than this is written one item a line
BREAKS = ("\n", "\r", "\x85", "\u2028", "\u2029")


def scalar(value: Any) -> str:
    """One scalar (or a flow list of scalars) on one line, as PyYAML spells it."""
    if isinstance(value, (list, tuple)):
        flow: str = yaml.safe_dump(list(value), default_flow_style=True, width=10**9,
                                   allow_unicode=True)
        return flow.strip()
    style = '"' if isinstance(value, str) and any(b in value for b in BREAKS) else None
    text: str = yaml.safe_dump(value, default_style=style, width=10**9, allow_unicode=True)
    return text.removesuffix("\n...\n").removesuffix("\n")


def _comment_line(text: str) -> str:
    return ("# " + _one_line(text)).rstrip()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _tail(path: Path, comments: Mapping[Path, str]) -> str:
    note = comments.get(path)
    return f"  # {_one_line(note)}" if note else ""


def _mapping(data: Mapping[str, Any], path: Path, depth: int,
             comments: Mapping[Path, str], out: list[str], first: str | None = None) -> None:
    """Write `data` at `depth`; `first` replaces the indent of the first line (a list dash)."""
    pad = " " * (INDENT * depth)
    for i, (key, value) in enumerate(data.items()):
        if not isinstance(key, str):
            raise TypeError(f"mapping keys must be strings, not {key!r}")
        lead = first if (first is not None and i == 0) else pad
        here = path + (key,)
        _entry(f"{lead}{scalar(key)}:", value, here, depth, comments, out)


def _entry(prefix: str, value: Any, path: Path, depth: int,
           comments: Mapping[Path, str], out: list[str]) -> None:
    tail = _tail(path, comments)
    if isinstance(value, Mapping) and value:
        out.append(prefix + tail)
        _mapping(value, path, depth + 1, comments, out)
    elif isinstance(value, Mapping):
        out.append(f"{prefix} {{}}{tail}")
    elif isinstance(value, (list, tuple)) and value and not _flow_ok(value):
        out.append(prefix + tail)
        _items(value, path, depth, comments, out)
    elif isinstance(value, (list, tuple)):
        out.append(f"{prefix} {scalar(value)}{tail}")
    elif isinstance(value, str) and _literal_ok(value):
        _literal(prefix, value, depth, tail, out)
    else:
        out.append(f"{prefix} {scalar(value)}{tail}")


def _items(items: Sequence[Any], path: Path, depth: int, comments: Mapping[Path, str],
           out: list[str]) -> None:
    """A block sequence at `depth` (dashes under the parent key); mappings inline the dash."""
    pad = " " * (INDENT * depth)
    for item in items:
        if isinstance(item, Mapping) and item:
            _mapping(item, path, depth + 1, comments, out, first=pad + "- ")
        elif isinstance(item, str) and _literal_ok(item):
            _literal(f"{pad}-", item, depth, "", out)
        else:
            out.append(f"{pad}- {scalar(item)}")


def _flow_ok(items: Sequence[Any]) -> bool:
    """A short list of plain scalars reads best on one line: `[0.9, 0.98]`."""
    if any(isinstance(v, (Mapping, list, tuple)) for v in items):
        return False
    return len(scalar(items)) <= FLOW_WIDTH and "\n" not in scalar(items)


def _literal_ok(text: str) -> bool:
    """Multi-line text that a `|-` block keeps exactly (no edge blanks, trailing or odd spaces)."""
    if "\n" not in text or text != text.strip("\n") or "\r" in text:
        return False
    lines = text.split("\n")
    return all(line == line.rstrip() and line.isprintable() for line in lines) \
        and bool(lines[0].strip()) and "\t" not in text


def _literal(prefix: str, text: str, depth: int, tail: str, out: list[str]) -> None:
    step = INDENT * (depth + 1)
    indicator = str(INDENT) if text.startswith(" ") else ""
    out.append(f"{prefix} |{indicator}-{tail}")
    pad = " " * step
    out.extend((pad + line) if line else "" for line in text.split("\n"))
