"""CounterFact-format records: load, validate, save, and turn into edit requests.

A record (as in the original CounterFact / MultiCounterFact JSON files)::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English"}, "target_true": {"str": "French"},
                           "relation_id": "P103"},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], "generation_prompts": [...]}

On input, ``target_new`` / ``target_true`` may be ``{"str": ..., "id": ...}`` dicts or plain
strings; other keys of the original files (``attribute_prompts``, ``dependency_prompts``, ...) are
ignored. On output the targets are written as ``{"str": ...}`` dicts, so the files we write load
with code written for the original data set.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True)
class Rewrite:
    """The requested change: ``prompt.format(subject)`` should now be completed by ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str
    relation_id: str | None = None


@dataclass(frozen=True)
class Record:
    """One CounterFact case: the rewrite and the prompts that evaluate it."""

    case_id: int
    requested_rewrite: Rewrite
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    generation_prompts: list[str] = field(default_factory=list)

    @property
    def relation_id(self) -> str | None:
        return self.requested_rewrite.relation_id


@dataclass(frozen=True)
class EditRequest:
    """What an editor consumes: ``prompt`` keeps the ``{}`` placeholder for ``subject``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str
    case_id: int

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)


def to_request(record: Record) -> EditRequest:
    """The edit request of a record."""
    rw = record.requested_rewrite
    return EditRequest(rw.prompt, rw.subject, rw.target_new, rw.target_true, record.case_id)


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------
def _fail(where: str, field_name: str, problem: str) -> ValueError:
    return ValueError(f"{where}: field {field_name!r} {problem}")


def _text(value: Any, where: str, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, field_name, f"must be a non-empty string, got {value!r}")
    return value


def _target(value: Any, where: str, field_name: str) -> str:
    """A target given as ``{"str": ...}`` (original files) or as a plain string."""
    if isinstance(value, dict):
        if "str" not in value:
            raise _fail(where, field_name, "is a dict without a 'str' key")
        value = value["str"]
    return _text(value, where, field_name)


def _prompts(raw: dict[str, Any], key: str, where: str, required: bool = True) -> list[str]:
    if key not in raw:
        if required:
            raise _fail(where, key, "is missing")
        return []
    value = raw[key]
    if not isinstance(value, list):
        raise _fail(where, key, f"must be a list of strings, got {type(value).__name__}")
    for i, prompt in enumerate(value):
        _text(prompt, where, f"{key}[{i}]")
    return list(value)


def _template(value: Any, where: str) -> str:
    prompt = _text(value, where, "requested_rewrite.prompt")
    if prompt.count("{}") != 1:
        raise _fail(where, "requested_rewrite.prompt", f"must contain '{{}}' exactly once, got {prompt!r}")
    try:  # any other brace (a named placeholder such as {kind}, a lone '{') would fail mid-run
        prompt.format("subject")
    except (KeyError, IndexError, ValueError) as err:
        raise _fail(where, "requested_rewrite.prompt",
                    f"may hold no placeholder but '{{}}' (write a literal brace as '{{{{' or '}}}}'), "
                    f"got {prompt!r} ({type(err).__name__}: {err})") from None
    return prompt


def _rewrite(raw: Any, where: str) -> Rewrite:
    if not isinstance(raw, dict):
        raise _fail(where, "requested_rewrite", "is missing or not a dict")
    for key in ("prompt", "subject", "target_new", "target_true"):
        if key not in raw:
            raise _fail(where, f"requested_rewrite.{key}", "is missing")
    rw = Rewrite(
        prompt=_template(raw["prompt"], where),
        subject=_text(raw["subject"], where, "requested_rewrite.subject"),
        target_new=_target(raw["target_new"], where, "requested_rewrite.target_new"),
        target_true=_target(raw["target_true"], where, "requested_rewrite.target_true"),
        relation_id=raw.get("relation_id"),
    )
    if rw.target_new == rw.target_true:
        raise _fail(where, "requested_rewrite.target_new", f"equals target_true ({rw.target_true!r})")
    return rw


def parse_record(raw: Any, index: int = 0) -> Record:
    """Validate one record dict; ``ValueError`` names the record (index, case_id) and the field."""
    case = raw.get("case_id") if isinstance(raw, dict) else None
    where = f"record {index} (case_id={case!r})"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a dict, got {type(raw).__name__}")
    if isinstance(case, bool) or not isinstance(case, int):
        raise _fail(where, "case_id", f"must be an integer, got {case!r}")
    return Record(
        case_id=case,
        requested_rewrite=_rewrite(raw.get("requested_rewrite"), where),
        paraphrase_prompts=_prompts(raw, "paraphrase_prompts", where),
        neighborhood_prompts=_prompts(raw, "neighborhood_prompts", where),
        generation_prompts=_prompts(raw, "generation_prompts", where, required=False),
    )


def parse_records(raws: Any) -> list[Record]:
    """Validate a list of record dicts; case ids must be unique."""
    if not isinstance(raws, list):
        raise ValueError(f"expected a JSON list of records, got {type(raws).__name__}")
    records = [parse_record(raw, i) for i, raw in enumerate(raws)]
    seen: dict[int, int] = {}
    for i, rec in enumerate(records):
        if rec.case_id in seen:
            raise ValueError(
                f"record {i} (case_id={rec.case_id}): field 'case_id' duplicates record {seen[rec.case_id]}"
            )
        seen[rec.case_id] = i
    return records


def load_records(path: str | Path) -> list[Record]:
    """Read our JSON or an original CounterFact / MultiCounterFact file."""
    with open(path, encoding="utf-8") as fh:
        try:
            raws = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        records = parse_records(raws)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not records:
        raise ValueError(f"{path}: holds no records")
    return records


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def record_to_dict(record: Record) -> dict[str, Any]:
    """The JSON form of a record, in the original CounterFact layout."""
    rw = record.requested_rewrite
    rewrite: dict[str, Any] = {
        "prompt": rw.prompt,
        "subject": rw.subject,
        "target_new": {"str": rw.target_new},
        "target_true": {"str": rw.target_true},
    }
    if rw.relation_id is not None:
        rewrite["relation_id"] = rw.relation_id
    return {
        "case_id": record.case_id,
        "requested_rewrite": rewrite,
        "paraphrase_prompts": list(record.paraphrase_prompts),
        "neighborhood_prompts": list(record.neighborhood_prompts),
        "generation_prompts": list(record.generation_prompts),
    }


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_records(records: Iterable[Record], path: str | Path) -> None:
    """Validate and write records as a JSON list (atomically)."""
    raws = [record_to_dict(r) for r in records]
    parse_records(raws)  # never write a file that would not load
    write_text_atomic(path, json.dumps(raws, ensure_ascii=False, indent=1) + "\n")
