"""When a long run should pause: one reading of a deadline, shared by ``python -m repro.study
--stop-at WHEN`` and by the runs themselves (the environment variable ``NORMGROWTH_STOP_AT``).

A deadline is written as ``HH:MM`` (local time, the next time the clock shows it), ``YYYY-MM-DD
HH:MM`` (local time unless it names a zone), a delay ``+90m`` / ``+2.5h`` / ``+30s`` (from now), or
seconds since the epoch; it is read as seconds since the epoch. The study command reads its flag
once and hands the runs' kernels the result in seconds, so a delay counts from when the command
started, not from when each kernel read it.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import time
from typing import Callable

ENV = "NORMGROWTH_STOP_AT"
FORMS = "HH:MM, 'YYYY-MM-DD HH:MM', +90m / +2.5h / +30s, or seconds since the epoch"

_DELAY = re.compile(r"\+(\d+(?:\.\d+)?)([smh])")
_UNIT = {"s": 1, "m": 60, "h": 3600}


def parse(text: str, clock: Callable[[], float] | None = None) -> float:
    """Seconds since the epoch for a deadline written in one of the forms above. ``clock()`` (seconds
    since the epoch, default :func:`time.time`), read only for a delay or a clock time, anchors
    them. Raises ValueError on anything else."""
    clock = clock or time.time
    text = text.strip()
    delay = _DELAY.fullmatch(text)
    if delay:
        return clock() + float(delay.group(1)) * _UNIT[delay.group(2)]
    if re.fullmatch(r"\d{9,}(?:\.\d+)?", text):
        return float(text)
    hhmm = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if hhmm:
        hour, minute = int(hhmm.group(1)), int(hhmm.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"not a clock time: {text!r}")
        start = dt.datetime.fromtimestamp(clock())
        when = start.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if when <= start:
            when += dt.timedelta(days=1)
        return when.timestamp()
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"a deadline is {FORMS}; got {text!r}") from None


def from_env(clock: Callable[[], float] | None = None) -> float | None:
    """The deadline in ``NORMGROWTH_STOP_AT`` (any form :func:`parse` reads), or None when it is
    unset or empty. A malformed value raises ValueError naming the variable."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        return parse(text, clock)
    except ValueError as err:
        raise ValueError(f"{ENV}: {err}") from None


def to_env(stop_at: float) -> None:
    """Hand the deadline, in seconds since the epoch, to the kernels and workers started after this."""
    os.environ[ENV] = repr(float(stop_at))
