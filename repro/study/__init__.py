"""Run a profile of the study: each run is a notebook executed by papermill with its parameters,
writing a NetCDF file under ``data/runs/`` and leaving the executed notebook in ``book/runs/`` for
the book. Runs whose file and executed notebook exist are skipped, unless the file was made with
other values of the declared parameters (stale): those are rerun, replacing the file.

    python -m repro.study --profile default [--only ID ...] [--force] [--list] [--toc] [--snapshot]
                          [--stop-at WHEN]
    python -m repro.study --profile smoke --nbval

Every selected run's parameters are checked (names, types, ranges: :mod:`repro.core.params`) before any
notebook executes; all bad entries are reported at once.

``--nbval`` (re)makes the notebooks the tests re-execute with nbval: for each notebook, the first
run of the profile, executed, as ``tests/notebooks/<notebook>.ipynb`` (the notebook with the run's
parameters injected by papermill after its parameters cell, and the outputs of that execution).

``--stop-at WHEN`` gives sequential runs a deadline (a clock time ``HH:MM``, a date and time
``YYYY-MM-DD HH:MM``, a delay ``+90m`` / ``+2.5h``, or seconds since the epoch): a run whose batch
ends after it saves its state and pauses, runs not yet started are left for later, and the command
exits with status 3; rerunning it resumes them. It sets ``NORMGROWTH_STOP_AT`` for the runs.

``--snapshot`` writes, for each run of the profile that is in progress (its resume state exists),
a view of what it has done so far to ``data/runs/progress/`` without touching the run; the book
draws unfinished long runs from there, marked as in progress.

After running, the book's "Runs" part of ``book/_toc.yml`` lists every executed run of the default
profile (``--toc`` does only that).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from repro.core import deadline
from repro.core.paths import ROOT, from_root

PROFILES = ROOT / "study.yaml"
EXECUTED = ROOT / "book" / "runs"
NBVAL = ROOT / "tests" / "notebooks"
TOC = ROOT / "book" / "_toc.yml"


# Parameters added after some runs were made, with the value those older files implicitly used.
IMPLICIT = {"measure_every": 0, "measure": {}, "measure_at": [], "collapse": {}, "dtype": "float32"}

RUNS_PART = "Runs (executed notebooks)"
PAUSED = 3  # the exit status when runs paused at the deadline (or were left for after it)


def _now() -> float:
    """The clock that anchors ``--stop-at``'s delays and clock times and that the deadline is checked
    against before each run starts (a seam for tests)."""
    return time.time()


@dataclass
class Run:
    id: str
    notebook: str
    parameters: dict
    title: str | None = None
    executed_dir: Path | None = None  # where its executed notebook goes (default: the book's runs/)

    @property
    def output(self) -> Path:
        return from_root(self.parameters["output"])

    @property
    def executed(self) -> Path:
        return (self.executed_dir or EXECUTED) / f"{self.id}.ipynb"

    def done(self) -> bool:
        return self.output.exists() and self.executed.exists()

    def stale(self) -> list[str]:
        """The declared parameters whose values differ from those the run's file was made with;
        empty when they agree. A parameter the file does not record is compared with the value
        files made before it existed implicitly used (``IMPLICIT``), or not at all (notebook-level
        parameters such as an evaluation count are not stored in the file)."""
        import json

        from repro.core.store import read_netcdf, run_params

        try:
            made = run_params(read_netcdf(self.output))
        except (OSError, ValueError, KeyError) as err:
            return [f"<unreadable {self.output.name}: {type(err).__name__}>"]
        norm = lambda v: json.loads(json.dumps(v, sort_keys=True, default=str))  # noqa: E731
        return sorted(k for k, v in self.parameters.items()
                      if k not in ("overwrite", "output")
                      and (k in made or k in IMPLICIT) and norm(v) != norm(made.get(k, IMPLICIT.get(k))))


    def status(self) -> tuple[str, str]:
        """Where the run stands, and why, for ``--list``: ``done``; ``stale`` (its file was made with
        other parameters); ``running`` (a live process on this host holds its lock), ``locked`` (a
        process on another host does); ``partial`` (only a resume state: an interrupted run that
        resumes from it); ``missing``. Unfinished runs with a resume state say how many edits it
        holds. Looks only: nothing is moved, locked or rewritten."""
        from repro.core.store import RunLock, peek_state, state_path

        if self.done():
            stale = self.stale()
            return ("stale", f"made with other {', '.join(stale)}") if stale else ("done", "")
        holder, owner = RunLock(self.output).holder()
        if holder == "alive":
            here = owner.get("host") == platform.node()
            status, why = ("running" if here else "locked"), f"pid {owner.get('pid')} on {owner.get('host')}"
        else:
            status, why = "missing", ""
        state = state_path(self.output)
        if state.exists():
            status = "partial" if status == "missing" else status
            try:
                held = peek_state(state)
                done = held.get("done")
                of = self.parameters.get("n_edits")
                made = f"{done:,} of {of:,} edits made" if isinstance(of, int) else f"{done:,} edits made"
                pace = _pace(held, of - done if isinstance(of, int) else None)
                made = f"{made}; {pace}" if pace else made
            except Exception as err:  # noqa: BLE001 - any unreadable state is reported, not raised
                made = f"unreadable resume state {state.name}: {type(err).__name__}"
            why = f"{made}; {why}" if why else made
        return status, why


def _pace(state: dict, left: int | None, last: int = 100) -> str:
    """How fast a resumable run has lately been editing, from its state's per-fact editor seconds
    (the median over its ``last`` edits, and the device and thread count it last ran on), and the
    editor time that pace leaves for its ``left`` edits; checkpoints and probes come on top. Empty
    when the state holds no timed edits."""
    from statistics import median

    from repro.core.store import threads_note

    secs = [float(r["edit_seconds"]) for r in (state.get("rows") or [])[-last:]
            if isinstance(r, dict) and r.get("edit_seconds") is not None]
    if not secs:
        return ""
    med = median(secs)
    threads = (state.get("threads") or [-1])[-1]  # torch's CPU threads in its last stretch; -1: not recorded
    where = f" on {state['device']}{threads_note(threads)}" if state.get("device") else ""
    pace = f"{med:.3g} s/edit{where} over the last {len(secs):,}"
    if left and left > 0:
        secs_left = med * left
        eta = (f"~{secs_left / 3600:.1f} h" if secs_left >= 360 else
               f"~{secs_left / 60:.0f} min" if secs_left >= 60 else "under a minute")
        pace += f", so {eta} of editing for the {left:,} left"
    return pace


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _fill(template, values: dict):
    """``template`` with ``{name}`` replaced by ``values`` in its strings, inside dicts and lists too."""
    if isinstance(template, dict):
        return {k: _fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, values) for v in template]
    if isinstance(template, str):
        try:
            return template.format(**values)
        except KeyError as err:
            raise ValueError(f"{template!r} names {err}, which is neither a grid axis nor a parameter") from None
    return template


def expand_grid(grid: dict, where: str) -> list[dict]:
    """The run entries of a grid: one per combination of the values of ``axes`` (in the order the
    axes and values are written), parameters = ``parameters`` + the combination + every matching
    ``overrides`` item (``where``: axis values that must all match; ``parameters``: what to set, or
    ``skip: true`` to leave the cell out). ``id``, ``title`` and string parameters are templates
    over the parameters (``{editor}``, ...), ``{id}`` and ``{<axis>_short}`` (``short``: a short name
    per axis value, e.g. for hub ids): the same values always give the same id."""
    import itertools

    missing = {"id", "notebook", "axes"} - set(grid)
    if missing:
        raise ValueError(f"{where}: a grid needs id, notebook and axes (missing {sorted(missing)})")
    axes = grid["axes"]
    short = grid.get("short", {})  # {axis: {value: short name}}: "{<axis>_short}" in templates
    if not isinstance(axes, dict) or not axes or any(not isinstance(v, list) or not v for v in axes.values()):
        raise ValueError(f"{where}: axes must map each parameter to a non-empty list of values")
    entries = []
    for combo in itertools.product(*axes.values()):
        cell = dict(zip(axes, combo))
        params = {**grid.get("parameters", {}), **cell}
        skip = False
        for item in grid.get("overrides", []):
            unknown = set(item.get("where", {})) - set(axes)
            if unknown:
                raise ValueError(f"{where}: overrides match on {sorted(unknown)}, which are not axes")
            if all(cell.get(k) == v for k, v in item.get("where", {}).items()):
                skip = skip or bool(item.get("skip", False))
                params.update(item.get("parameters", {}))
        if skip:
            continue
        names = {**params, **{f"{a}_short": short[a].get(cell[a], cell[a]) for a in short}}
        run_id = _fill(grid["id"], names)
        filled = {k: _fill(v, {**names, "id": run_id}) for k, v in params.items()}
        entries.append({"id": run_id, "notebook": grid["notebook"], "parameters": filled,
                        "title": _fill(grid.get("title"), {**names, "id": run_id})})
    return entries


def load_profile(name: str, path: Path | None = None) -> list[Run]:
    """The runs of profile ``name``: each entry is a run, or a ``grid`` that expands into runs
    (:func:`expand_grid`)."""
    table = yaml.safe_load((path or PROFILES).read_text())
    if name not in table:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(table))}")
    runs = []
    for i, item in enumerate(table[name]):
        entries = expand_grid(item["grid"], f"profile {name!r} grid #{i}") if "grid" in item else [item]
        for entry in entries:
            missing = {"id", "notebook", "parameters"} - set(entry)
            if missing or "output" not in entry.get("parameters", {}):
                raise ValueError(f"profile {name!r} run #{i}: needs id, notebook and parameters.output "
                                 f"(missing {sorted(missing) or ['parameters.output']})")
            runs.append(Run(entry["id"], entry["notebook"], dict(entry["parameters"]), entry.get("title")))
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"profile {name!r} has duplicate run ids")
    return runs


def invalid_runs(runs: list[Run]) -> list[str]:
    """A line per run whose parameters are not valid for its notebook (unknown names, wrong types
    or ranges); empty when all are. Loads no model."""
    from repro.core.params import check_run

    bad = []
    for run in runs:
        try:
            check_run(run.notebook, run.parameters)
        except (ValueError, TypeError) as err:
            bad.append(f"{run.id}: {err}")
        facts = run.parameters.get("facts")
        if facts and not from_root(facts).exists():
            bad.append(f"{run.id}: its facts file {facts} does not exist; a data set you supply goes where the "
                       f"profile says (see the comments of study.yaml and data/counterfact/README.md)")
    return bad


def nbval_runs(runs: list[Run]) -> list[Run]:
    """The first run of each notebook: the instance the tests re-execute."""
    first: dict[str, Run] = {}
    for run in runs:
        first.setdefault(run.notebook, run)
    return list(first.values())


def nbval_path(run: Run) -> Path:
    return NBVAL / Path(run.notebook).name


def nbval_instance(run: Run):
    """The notebook of ``run`` with its parameters injected as papermill does (no outputs)."""
    import nbformat
    from papermill.parameterize import parameterize_notebook

    nb = nbformat.read(from_root(run.notebook), as_version=4)
    nb.metadata.setdefault("papermill", {})
    return parameterize_notebook(nb, dict(run.parameters), kernel_name="python3", language="python")


def write_nbval(runs: list[Run]) -> list[Path]:
    """Execute each notebook's instance and store it, outputs included, under tests/notebooks/."""
    import papermill as pm

    NBVAL.mkdir(parents=True, exist_ok=True)
    written = []
    for run in nbval_runs(runs):
        out = nbval_path(run)
        print(f"[nbval] {run.id}: {run.notebook} -> {_show(out)}", flush=True)
        pm.execute_notebook(str(from_root(run.notebook)), str(out), parameters=dict(run.parameters),
                            cwd=str(ROOT), kernel_name="python3", progress_bar=False)
        written.append(out)
    return written


def deadline_from(text: str, now: float | None = None) -> float:
    """Seconds since the epoch for ``--stop-at`` (:func:`repro.core.deadline.parse`), with delays
    and clock times counted from ``now``, default :func:`_now`. Raises ValueError on a malformed
    value."""
    try:
        return deadline.parse(text, _now if now is None else (lambda: now))
    except ValueError as err:
        raise ValueError(f"--stop-at takes {deadline.FORMS}; got {text.strip()!r}") from err


def too_late(stop_at: float | None) -> bool:
    """Whether a run whose turn comes now should be left for later: a deadline is set and has passed."""
    return stop_at is not None and _now() >= stop_at


def paused(err: BaseException) -> bool:
    """Whether ``err`` (as papermill raises it from a run's notebook) is a run pausing at its deadline."""
    return getattr(err, "ename", type(err).__name__) == "Paused"


def pause_message(err: BaseException) -> str:
    """The run's own line for a pause ("…: paused at its deadline after N of M edits; …")."""
    text = str(getattr(err, "evalue", "") or err).strip().splitlines()
    return text[-1] if text else "paused"


def execute(run: Run, force: bool = False) -> None:
    import papermill as pm

    from repro.core.params import accepts

    params = dict(run.parameters)
    if force and accepts(run.notebook, "overwrite"):
        params["overwrite"] = True
    run.executed.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.executed.with_name(f".{run.executed.name}.tmp.ipynb")
    pm.execute_notebook(
        str(from_root(run.notebook)), str(tmp), parameters=params, cwd=str(ROOT),
        kernel_name="python3", progress_bar=True, log_output=True,
    )
    quiet_stderr(tmp)
    tmp.replace(run.executed)


def quiet_stderr(notebook: Path) -> None:
    """Mark an executed run notebook so that the book leaves out its stderr (progress bars, library
    warnings with this machine's paths): the book shows what the run printed, its figures and its
    errors, never its progress. The notebook file keeps everything."""
    import json

    nb = json.loads(notebook.read_text())
    if nb.setdefault("metadata", {}).get("mystnb", {}).get("output_stderr") == "remove":
        return
    nb["metadata"].setdefault("mystnb", {})["output_stderr"] = "remove"
    notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def sync_toc(runs: list[Run], toc: Path | None = None) -> list[str]:
    """List every run whose executed notebook exists in the book's "Runs" part (in profile
    order), so the book shows exactly the runs that were made; returns the listed ids."""
    toc = toc or TOC
    table = yaml.safe_load(toc.read_text())
    part = next((p for p in table.get("parts", []) if p.get("caption") == RUNS_PART), None)
    if part is None:
        raise ValueError(f"{toc} has no part captioned {RUNS_PART!r}")
    book_dir = toc.parent
    listed = [r for r in runs if r.executed.exists()]
    part["chapters"] = [
        {"file": str(r.executed.relative_to(book_dir).with_suffix("")), "title": r.title or f"Run: {r.id}"}
        for r in listed
    ]
    tmp = toc.with_name(f".{toc.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(table, sort_keys=False, allow_unicode=True))
    os.replace(tmp, toc)  # written once, whole: readers never see half a table of contents
    return [r.id for r in listed]


def snapshot_runs(runs: list[Run]) -> int:
    """Write a progress view of each sequential run with a resume state; say which have none."""
    from repro.runs.sequential import progress_path, snapshot
    from repro.core.store import state_path

    for run in runs:
        if not state_path(run.output).exists():
            continue
        if run.notebook != "notebooks/sequential_editing.ipynb":
            print(f"[skip] {run.id}: progress views exist for sequential editing runs only")
            continue
        ds = snapshot(run.output)
        print(f"[snap] {run.id}: {ds.attrs['n_edits_done']} of {run.parameters.get('n_edits')} edits "
              f"-> {_show(progress_path(run.output))}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repro.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--only", nargs="*", help="run ids to run (default: all of the profile)")
    ap.add_argument("--force", action="store_true", help="rerun even when results exist")
    ap.add_argument("--list", action="store_true", help="list the runs and whether they are done")
    ap.add_argument("--toc", action="store_true", help="only list the executed runs in the book's TOC")
    ap.add_argument("--snapshot", action="store_true",
                    help="only write views of the runs in progress (those with a resume state) to data/runs/progress/")
    ap.add_argument("--nbval", action="store_true",
                    help="only (re)make tests/notebooks/: each notebook's first run of the profile, executed")
    ap.add_argument("--workers", type=int, default=None,
                    help="run the missing runs side by side on a local Dask cluster of this many workers")
    ap.add_argument("--scheduler", default=None, help="submit the runs to this Dask scheduler instead")
    ap.add_argument("--stop-at", metavar="WHEN", default=None,
                    help="pause sequential runs after the first batch that ends after WHEN (HH:MM, 'YYYY-MM-DD "
                         "HH:MM', +90m, +2.5h, or seconds since the epoch) and start no run after it; exit "
                         f"status {PAUSED}; rerun to resume")
    ap.add_argument("--file", type=Path, default=None, help=argparse.SUPPRESS)  # another profiles file (tests)
    ap.add_argument("--executed", type=Path, default=None, help=argparse.SUPPRESS)  # another executed-notebook dir
    args = ap.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    try:  # --stop-at, else a deadline already in the environment
        stop_at = deadline_from(args.stop_at) if args.stop_at else deadline.from_env(_now)
    except ValueError as err:
        ap.error(str(err))
    runs = load_profile(args.profile, args.file)
    for run in runs:
        run.executed_dir = args.executed
    if args.toc:
        print("book TOC lists:", ", ".join(sync_toc(runs)))
        return 0
    if args.only:
        unknown = set(args.only) - {r.id for r in runs}
        if unknown:
            ap.error(f"unknown run ids {sorted(unknown)}")
        runs = [r for r in runs if r.id in args.only]
    bad = invalid_runs(runs)
    if bad and args.list:  # the listing still shows every run; say what would stop them
        for line in bad:
            print(f"  note: {line}", file=sys.stderr)
    elif bad:
        print(f"{len(bad)} run(s) of profile {args.profile!r} with invalid parameters (nothing was run):",
              file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        return 2
    if args.snapshot:
        return snapshot_runs(runs)
    if args.nbval:
        write_nbval(runs)
        return 0
    jobs = []
    for run in runs:
        if args.list:
            status, why = run.status()
            print(f"{run.id:<40} {status:<8} {_show(run.output)}" + (f"  ({why})" if why else ""))
            continue
        stale = run.stale() if run.done() else []
        status = ("stale" if stale else "done") if run.done() else "missing"
        if status == "done" and not args.force:
            print(f"[skip] {run.id}: {_show(run.output)} exists")
            continue
        why = f" (stale: {', '.join(stale)} changed)" if stale else ""
        print(f"[run]  {run.id}: {run.notebook} -> {_show(run.output)}{why}", flush=True)
        jobs.append((run, args.force or bool(stale)))
    if args.list:
        return 0
    if stop_at is not None:  # the runs' kernels (and local Dask workers) inherit it; remote ones get it passed
        deadline.to_env(stop_at)
        print(f"[stop-at] runs pause after the first batch that ends after "
              f"{dt.datetime.fromtimestamp(stop_at):%Y-%m-%d %H:%M:%S}", flush=True)
    failed = n_paused = 0
    if args.workers or args.scheduler:
        from repro.study.parallel import run_parallel

        outcomes = run_parallel(jobs, args.workers, args.scheduler, echo=lambda line: print(line, flush=True),
                                stop_at=stop_at)
        failed = sum(o.status == "failed" for o in outcomes)
        n_paused = sum(o.status in ("paused", "not started") for o in outcomes)
    else:
        for run, force in jobs:
            if too_late(stop_at):
                print(f"[wait] {run.id}: not started, the deadline has passed", flush=True)
                n_paused += 1
                continue
            t0 = time.perf_counter()
            try:
                execute(run, force=force)
            except Exception as err:
                if not paused(err):
                    raise
                print(f"[paused] {run.id} after {time.perf_counter() - t0:.0f} s: {pause_message(err)}", flush=True)
                n_paused += 1
                continue
            print(f"[done] {run.id} in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.profile == "default" and args.file is None:
        sync_toc(load_profile(args.profile))
    if failed:
        print(f"{failed} run(s) failed; rerun the same command to resume them", file=sys.stderr)
        return 1
    if n_paused:
        print(f"{n_paused} run(s) paused or left for later at the deadline; rerun the same command "
              f"(with a later --stop-at, or none) to resume them", file=sys.stderr)
        return PAUSED
    return 0
