"""Wikipedia paragraphs for second-moment statistics (``train``) and perplexity (``test``).

The paragraphs are the SQuAD contexts of BIG-bench's ``squad_shifts`` task (``squaddev_v1.1``:
SQuAD v1.1 dev articles; ``new_wiki_v1.0``: newer Wikipedia articles), deduplicated, one paragraph
per line. The split is by article, so no article contributes to both parts: within each source file
every fifth article (index 4, 9, 14, ...) is ``test``, the others ``train``. The committed files
``data/text/wiki_{train,test}.txt`` are what :func:`load_text` reads; :func:`build_text`
regenerates them from the BIG-bench tarball.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from repro.data.counterfact import write_text_atomic
from repro.data.sources import read_members

TEXT_DIR = Path(__file__).resolve().parents[2] / "data" / "text"
SOURCES = ("squad_shifts/squaddev_v1.1.json", "squad_shifts/new_wiki_v1.0.json")
SPLITS = ("train", "test")
TEST_EVERY = 5  # article i of a source goes to test when i % TEST_EVERY == TEST_EVERY - 1


def text_path(split: str, root: str | Path | None = None) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(root or TEXT_DIR) / f"wiki_{split}.txt"


def load_text(split: str = "train", root: str | Path | None = None) -> list[str]:
    """The paragraphs of a split, in file order."""
    path = text_path(split, root)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with: python -m repro.data build-text")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _clean(paragraph: str) -> str:
    return re.sub(r"\s+", " ", paragraph).strip()


def split_articles(squad: dict, seen: set[str]) -> dict[str, list[str]]:
    """Paragraphs of one SQuAD-format file by split; skips those already in ``seen`` (updated)."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, article in enumerate(squad["data"]):
        split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
        for para in article["paragraphs"]:
            text = _clean(para["context"])
            if text and text not in seen:
                seen.add(text)
                out[split].append(text)
    return out


def build_text(tarball: str | Path | None = None, root: str | Path | None = None) -> dict[str, int]:
    """Regenerate the split files from the tarball; returns the paragraph count of each split."""
    raw = read_members(list(SOURCES), tarball)
    seen: set[str] = set()
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in SOURCES:
        for split, paragraphs in split_articles(json.loads(raw[name]), seen).items():
            parts[split].extend(paragraphs)
    for split, paragraphs in parts.items():
        write_text_atomic(text_path(split, root), "\n".join(paragraphs) + "\n")
    return {s: len(p) for s, p in parts.items()}
