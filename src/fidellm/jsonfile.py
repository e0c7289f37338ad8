"""The small JSON files stages hand each other (state.json, meta.json, config.json), read with errors
that name the file instead of a JSONDecodeError or a KeyError later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fidellm.errors import FidelError


def read_json(path: Path, advice: str = "") -> Any:
    """The JSON value in `path`; a missing or unreadable file or invalid JSON is a FidelError naming the
    file, followed by `advice` (what to do about it) when given."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError and UnicodeDecodeError
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise FidelError(f"{path}: not valid JSON ({first}){_tail(advice)}") from None


def read_json_object(path: Path, advice: str = "") -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object; another JSON value is a FidelError too."""
    data = read_json(path, advice)
    if not isinstance(data, dict):
        raise FidelError(f"{path}: not a JSON object{_tail(advice)}")
    return data


def _tail(advice: str) -> str:
    return f"; {advice}" if advice else ""
