"""Paths relative to the project root, so run parameters stay the same on every clone."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def from_root(path: str | Path) -> Path:
    """``path`` itself when absolute, else resolved against the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else ROOT / path
