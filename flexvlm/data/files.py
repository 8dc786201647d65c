"""Reading annotation files: errors name the file and the place in it (line, column, byte)."""

import json
from pathlib import Path
from typing import Any


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file; a missing file or a byte that is not UTF-8 is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line} (byte {err.start}); "
                         "save the file as UTF-8") from err


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file (``what`` names it in errors)."""
    return parse_json(read_text(path, what), str(path))
