"""One lifecycle for every kind of run.

A run turns parameters into one NetCDF file. Whatever it computes (a sequence of edits, single
edits, a layer sweep, post-training, MEND meta-training, key agreement), it goes through the same
steps, written here once:

1. check the parameters (types, then ranges) before anything is loaded;
2. reuse the finished file when it was made with the same parameters (an error when it was made
   with others, unless ``overwrite``);
3. hold the run's lock (:class:`repro.core.store.RunLock`) while computing, so that two processes never
   write the same run;
4. resume from the state file ``<output>.state.pt`` when it was saved with the same parameters
   (:meth:`Run.resume`), and save it atomically as the run goes (:meth:`Run.save`), carrying the
   wall time across interruptions;
5. write the file atomically with its provenance, and remove the state file (:meth:`Run.finish`).

A run kind supplies only its computation, as a function ``body(run) -> Dataset`` that calls
``run.resume()``, ``run.save(state)`` and ``run.finish(ds, device, ...)``; :func:`execute` does
the rest.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import xarray as xr

from repro.core import store
from repro.core.params import check_types
from repro.core.paths import from_root

log = logging.getLogger(__name__)


class Run:
    """The lifecycle of one run writing ``output``: its recorded parameters, its state file and
    its clock. ``same_params(saved, current)`` decides whether a saved state belongs to this run
    (default: equal)."""

    def __init__(self, output: str | Path, params: dict,
                 same_params: Callable[[dict, dict], bool] | None = None):
        self.output = from_root(output)
        self.params = params
        self.state_file = store.state_path(self.output)
        self._same = same_params or (lambda saved, current: saved == current)
        self._t0 = time.perf_counter()

    def resume(self, check: Callable[[dict], bool] | None = None) -> dict | None:
        """The saved state of this run, or None: none saved, a damaged file (moved aside), one made
        with other parameters, or one that ``check(state)`` rejects (all but the first logged). The
        clock continues from the saved ``elapsed``; without a state it starts now."""
        saved = store.load_state(self.state_file)
        self.start_clock()
        if saved is None:
            return None
        if not self._same(saved.get("params", {}), self.params) or (check is not None and not check(saved)):
            log.warning("ignoring %s: it was made with other parameters", self.state_file)
            return None
        self.start_clock(float(saved.get("elapsed", 0.0)))
        log.info("resuming %s", self.output.name)
        return saved

    def start_clock(self, elapsed: float = 0.0) -> None:
        """(Re)start the wall clock with ``elapsed`` seconds already spent in earlier stretches."""
        self._t0 = time.perf_counter() - elapsed

    def elapsed(self) -> float:
        """Wall seconds the run has taken, over all its stretches."""
        return time.perf_counter() - self._t0

    def save(self, state: dict) -> None:
        """Save the resume state atomically, with the parameters and the elapsed time."""
        store.save_state(self.state_file, {**state, "params": self.params, "elapsed": self.elapsed()})

    def finish(self, ds: xr.Dataset, device: str, wall_time: bool = True, **attrs: Any) -> xr.Dataset:
        """Add provenance (parameters, git sha, packages, device, date, run id, wall time and
        ``attrs``), write the file atomically, remove the state file; return ``ds``."""
        extra = {"run_id": self.output.stem, **attrs}
        if wall_time:
            extra.setdefault("wall_time_s", round(self.elapsed(), 2))
        ds.attrs.update(store.provenance(self.params, device, **extra))
        store.write_netcdf(ds, self.output)
        self.state_file.unlink(missing_ok=True)
        return ds


def execute(params, body: Callable[[Run], xr.Dataset], overwrite: bool = False,
            same_params: Callable[[dict, dict], bool] | None = None) -> xr.Dataset:
    """Run ``body`` under the lifecycle for a params dataclass with ``output`` and ``validate()``.

    The file records the parameters as ``params.as_dict()`` where the class defines it (e.g. a
    layer sweep leaves out where it is written), else all fields; ``same_params`` compares a saved
    state's parameters with that record. Returns the finished file's Dataset, reused or made."""
    check_types(params)  # types first (the Python API too), then ranges
    params.validate()
    overwrite = store.parse_bool(overwrite, "overwrite")
    record = params.as_dict() if hasattr(params, "as_dict") else dataclasses.asdict(params)
    run = Run(params.output, record, same_params)
    done = store.existing_run(run.output, record, overwrite)
    if done is not None:
        return done
    with store.RunLock(run.output):
        return body(run)
