"""The small JSON files stages hand each other (state.json, meta.json, config.json), read with errors
that name the file instead of a JSONDecodeError or a KeyError later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fidellm.errors import FidelError


def read_json_object(path: Path, advice: str = "") -> dict[str, Any]:
    """The JSON object in `path`; a missing or unreadable file, invalid JSON or another JSON value is a
    FidelError naming the file, followed by `advice` (what to do about it) when given."""
    tail = f"; {advice}" if advice else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError and UnicodeDecodeError
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise FidelError(f"{path}: not valid JSON ({first}){tail}") from None
    if not isinstance(data, dict):
        raise FidelError(f"{path}: not a JSON object{tail}")
    return data
