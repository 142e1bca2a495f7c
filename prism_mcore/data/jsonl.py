"""JSON Lines read line by line, each line decoded on its own (and written atomically).

Decoding the whole file at once lets one bad byte (a truncated multi-byte character, a Latin-1 export)
kill every good line around it; here such a line is reported as `invalid_utf8` and the caller skips and
counts it like any other bad row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from prism_mcore.data.errors import DataError

INVALID_UTF8, INVALID_JSON = "invalid_utf8", "invalid_json"


def _open(path: str | Path):
    try:
        return open(path, "rb")
    except OSError as e:  # unreadable (permissions, a directory): the whole file is unusable
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def first_char(path: str | Path) -> str:
    """The first non-whitespace character of the file ('' when there is none), to tell a JSON array from
    JSON Lines without reading the whole file."""
    with _open(path) as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(1-based line number, record, None) for each line that parses, (line number, None, reason) for one
    that does not; blank lines are skipped. A UTF-8 byte-order mark on the first line is ignored."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, None, INVALID_UTF8
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # bad JSON, a >4300-digit integer, nesting deeper than the stack
                yield lineno, None, INVALID_JSON
                continue
            yield lineno, record, None


def atomic_write(path: str | Path, write) -> Path:
    """`write(tmp_path)` into a sibling temporary file, then rename it into place: a reader never sees half a
    file, and a crash leaves the old one."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_jsonl(path: str | Path, rows) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept), written atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return atomic_write(path, write)
