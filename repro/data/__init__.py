"""Data sets of the study: CounterFact-format edit records and Wikipedia text.

``python -m repro.data build-facts`` builds the records checked against a model,
``python -m repro.data build-text`` the train/test paragraph files, ``python -m repro.data
build-tasks`` the few-shot classification tasks of the downstream measurement.
"""
from repro.data.counterfact import (
    EditRequest,
    Record,
    Rewrite,
    load_records,
    parse_record,
    save_records,
    to_request,
)
from repro.data.tasks import FewShotTask, load_task
from repro.data.text import load_text

__all__ = [
    "EditRequest",
    "FewShotTask",
    "Record",
    "Rewrite",
    "load_records",
    "load_task",
    "load_text",
    "parse_record",
    "save_records",
    "to_request",
]
