"""A model folder's JSON file, read as the object it must hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fermi.errors import ModelLoadError


def read_json_object(path: Path) -> dict[str, Any]:
    """``path``'s JSON object; ModelLoadError naming the file when it is missing, is not
    JSON, or holds something other than an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"model folder {path.parent} has no {path.name}") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ModelLoadError(f"{path} nests JSON arrays or objects too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ModelLoadError(f"{path} holds a value that cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value
