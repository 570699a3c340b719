"""Advance long sequential runs of the study on an accelerator for a fixed time, then pack what they
made so it can be carried back and finished anywhere.

    python scripts/device_runs.py --minutes 8 --out DIR ID [ID ...]

Each ID is a sequential-editing run of the default profile (study.yaml). The runs go in parallel,
one process each, on ``$NORMGROWTH_DEVICE`` (default ``cuda``), with the parameters the notebook
would pass them, each resuming from its state file when there is one. At the deadline each saves
its state after its current batch and stops (:class:`repro.runs.sequential.Paused`); a run that
reaches its end writes its file. Before the runs start, one process loads each model and prepares
each editor once (dequantizing a packaged model, computing the editors' second-moment statistics),
so that parallel runs never write the same cache file.

Then it prints a table (run, edits before and after, seconds per edit in this stretch, outcome),
also written to DIR/summary.txt with each run's log in DIR/logs.tar.gz, and packs each finished
file or resume state, in the order given, into DIR/results.tar split into parts below the size
limit (``--part-mib``, ``--total-mib``); a state that does not fit is left out and the summary says
so. With ``--stage STAGE`` (a folder on the device machine that outlives the call) nothing is left
out: every part is written to STAGE, DIR gets the first parts that fit one return, and each later
call of ``device_runs.py --send STAGE --out DIR`` puts the next ones in DIR, until all have gone
(a state of ENCORE or AlphaEdit, which hold the Gram matrices of earlier keys, is about 68 MB on
SmolLM2-135M, more than one return). Back on any machine: ``cat results.tar.* | tar -x``, then ``python -m repro.study --only ID``
executes the run's notebook, reusing a finished file or resuming from the state. The file records
which stretch of the run was made on which device (``devices_by_segment``, ``segment_starts``).
On a copy of the repository, set ``NORMGROWTH_GIT_SHA`` to the commit the copy was made from (the
copy's own git metadata, if any travelled, may be stale), so the stretch records the code it ran.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOTEBOOK = "notebooks/sequential_editing.ipynb"
PAUSED, FAILED = 3, 1


def run_params(run_id: str, profile: str = "default", profiles: Path | None = None):
    """The SequentialParams the notebook would build for run ``run_id`` of ``profile`` (in
    ``profiles``, default study.yaml)."""
    from repro.core.params import Overwrite, build
    from repro.runs.sequential import SequentialParams
    from repro.study import load_profile

    runs = {r.id: r for r in load_profile(profile, profiles)}
    if run_id not in runs:
        raise ValueError(f"no run {run_id!r} in profile {profile!r}")
    run = runs[run_id]
    if not run.notebook.endswith(NOTEBOOK):
        raise ValueError(f"{run_id} is a run of {run.notebook}, not a sequential editing run")
    params, _ = build(SequentialParams, run.parameters, Overwrite)
    return params


def edits_done(params) -> int:
    """Edits a run has made: all of them when its file exists, else its state's count, else 0."""
    import torch

    from repro.core import store
    from repro.core.paths import from_root

    out = from_root(params.output)
    if out.exists():
        return params.n_edits
    state = store.state_path(out)
    return int(torch.load(state, weights_only=False)["done"]) if state.exists() else 0


def prepare(params: list) -> None:
    """Load each model once and prepare each distinct editor of ``params`` (SequentialParams):
    statistics into the cache."""
    from repro.core.models import DTYPES, load_model
    from repro.editors import make_editor

    done, models = set(), {}
    for p in params:
        key = (p.model, p.editor, repr(sorted(p.hparams.items())), p.dtype)
        if key in done:
            continue
        done.add(key)
        if (p.model, p.dtype) not in models:
            models[(p.model, p.dtype)] = load_model(p.model, device=p.device, dtype=DTYPES[p.dtype])
        t = time.perf_counter()
        try:
            make_editor(p.editor, models[(p.model, p.dtype)], **p.hparams).prepare()
        except Exception:  # the run itself will meet (and log) the same error, or prepare on its own
            traceback.print_exc()
            print(f"preparing {p.editor} on {p.model} failed; its runs prepare on their own", flush=True)
            continue
        print(f"prepared {p.editor} on {p.model} in {time.perf_counter() - t:.1f} s", flush=True)
    models.clear()


def worker(run_id: str, stop_at: float, profile: str, profiles: Path | None) -> int:
    """Run ``run_id`` until it ends or the deadline passes; the exit code says which."""
    from repro.runs.sequential import Paused, run_sequential

    try:
        run_sequential(run_params(run_id, profile, profiles), progress=True, stop_at=stop_at)
    except Paused as why:
        print(why, flush=True)
        return PAUSED
    return 0


@dataclass
class Outcome:
    run_id: str
    before: int
    after: int
    n_edits: int
    seconds: float  # wall seconds of this stretch
    code: int
    path: Path  # the finished file or the state to carry back

    def line(self) -> str:
        made = self.after - self.before
        rate = f"{self.seconds / made:.2f}" if made else "-"
        what = {0: "finished", PAUSED: "paused"}.get(self.code, f"failed ({self.code})")
        return f"{self.run_id:40s} {self.before:6d} {self.after:6d} / {self.n_edits:<6d} {rate:>8s}  {what}"


def _shown(p: Path) -> str:
    """``p`` relative to the repository where it lies inside it, else its name."""
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def pack(paths: list[Path], out: Path, part_bytes: int, total_bytes: int) -> tuple[list[Path], list[Path]]:
    """Tar ``paths`` (relative to the repository) in order into ``out`` parts of at most
    ``part_bytes``; a file that would take the total over ``total_bytes`` is left out. Returns
    (the parts, the files left out)."""
    kept, left, size = [], [], 0
    for p in paths:
        s = p.stat().st_size + 4096
        if size + s > total_bytes:
            left.append(p)
            continue
        kept.append(p)
        size += s
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in kept:
            tar.add(p, arcname=_shown(p))
    data = buf.getvalue()
    parts = []
    for i in range(0, len(data), part_bytes):
        part = out.with_name(f"{out.name}.{i // part_bytes:02d}")
        part.write_bytes(data[i : i + part_bytes])
        parts.append(part)
    return parts, left


def send(stage: Path, out: Path, total_bytes: int, max_files: int) -> tuple[list[Path], list[Path]]:
    """Copy into ``out``, in order, the parts in ``stage`` not sent before, as many as fit in
    ``total_bytes`` and ``max_files``, and record them as sent (``stage/sent.txt``). Returns (the
    parts copied now, the parts still to send). A part larger than ``total_bytes`` can never be sent:
    that is an error, not a silent skip."""
    record = stage / "sent.txt"
    sent = set(record.read_text().split()) if record.exists() else set()
    todo = sorted(p for p in stage.glob("results.tar.*") if p.name not in sent)
    now, size = [], 0
    for p in todo:
        if p.stat().st_size > total_bytes:
            raise ValueError(f"{p.name} ({p.stat().st_size} bytes) is larger than one return ({total_bytes} bytes)")
        if len(now) == max_files or size + p.stat().st_size > total_bytes:
            break
        now.append(p)
        size += p.stat().st_size
    out.mkdir(parents=True, exist_ok=True)
    for p in now:
        (out / p.name).write_bytes(p.read_bytes())
    with open(record, "a") as f:
        f.writelines(f"{p.name}\n" for p in now)
    return [out / p.name for p in now], todo[len(now):]


def _send_lines(stage: Path, sent: list[Path], rest: list[Path]) -> list[str]:
    return [f"sent now: {', '.join(p.name for p in sent) or 'nothing'}",
            f"still in {stage}: {', '.join(p.name for p in rest)} (next: device_runs.py --send {stage} --out DIR)"
            if rest else f"all parts of {stage} sent: cat results.tar.* | tar -x"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*")
    ap.add_argument("--minutes", type=float, default=8.0, help="deadline for the runs, from now")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_runs")))
    ap.add_argument("--part-mib", type=float, default=15.5)
    ap.add_argument("--total-mib", type=float, default=60.0)
    ap.add_argument("--profile", default="default", help="the profile the ids belong to")
    ap.add_argument("--profiles", type=Path, help="the profiles file (default: study.yaml)")
    ap.add_argument("--max-files", type=int, default=6, help="most parts in one return")
    ap.add_argument("--stage", type=Path, help="write every part here (no total limit); --out gets the first")
    ap.add_argument("--send", type=Path, metavar="STAGE", help="only put the next unsent parts of STAGE in --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.stop_at, a.profile, a.profiles)
    if a.send:
        if a.ids:
            ap.error("--send takes no run ids")
        if not a.send.is_dir():
            ap.error(f"--send: no staged parts in {a.send}")
        sent, rest = send(a.send, a.out, int(a.total_mib * 2**20), a.max_files)
        print("\n".join(_send_lines(a.send, sent, rest)))
        return 0
    if not a.ids:
        ap.error("name at least one run id")
    if a.minutes <= 0:
        ap.error(f"--minutes must be positive, got {a.minutes}")
    os.environ.setdefault("NORMGROWTH_DEVICE", "cuda")
    t0 = time.time()
    stop_at = t0 + 60 * a.minutes
    params = {i: run_params(i, a.profile, a.profiles) for i in a.ids}  # every id checked before anything loads
    a.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="device_runs_")) / "logs"  # packed into one file in DIR
    logs.mkdir()
    before = {i: edits_done(p) for i, p in params.items()}
    prepare([params[i] for i in a.ids if before[i] < params[i].n_edits])
    print(f"prepared in {time.time() - t0:.0f} s; runs until {time.strftime('%H:%M:%S', time.localtime(stop_at))}",
          flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "30"}
    procs = {}
    for i in a.ids:
        if before[i] >= params[i].n_edits:
            continue
        log = open(logs / f"{i}.log", "w")
        where = ["--profile", a.profile] + (["--profiles", str(a.profiles.resolve())] if a.profiles else [])
        procs[i] = (subprocess.Popen([sys.executable, __file__, "--worker", i, "--stop-at", str(stop_at), *where],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.time())
    codes, took, pending = {}, {}, dict(procs)
    while pending:
        time.sleep(1)
        for i, (proc, start) in list(pending.items()):
            if proc.poll() is not None:
                codes[i], took[i] = proc.returncode, time.time() - start
                del pending[i]
                print(f"{i}: exit {codes[i]} after {took[i]:.0f} s", flush=True)
    from repro.core import store
    from repro.core.paths import from_root

    outcomes = []
    for i, p in params.items():
        out = from_root(p.output)
        path = out if out.exists() else store.state_path(out)
        outcomes.append(Outcome(i, before[i], edits_done(p), p.n_edits, took.get(i, 0.0), codes.get(i, 0), path))
    carry = [o.path for o in outcomes if o.path.exists() and o.after > o.before]
    if a.stage:
        for old in [*a.stage.glob("results.tar.*"), a.stage / "sent.txt"]:  # an earlier call's parts
            old.unlink(missing_ok=True)
        parts, left = pack(carry, a.stage / "results.tar", int(a.part_mib * 2**20), sys.maxsize)
        sent, rest = send(a.stage, a.out, int(a.total_mib * 2**20), a.max_files)
    else:
        parts, left = pack(carry, a.out / "results.tar", int(a.part_mib * 2**20), int(a.total_mib * 2**20))
    lines = [f"{'run':40s} {'before':>6s} {'after':>6s} / {'planned':<6s} {'s/edit':>8s}  outcome",
             *[o.line() for o in outcomes],
             f"device: {os.environ['NORMGROWTH_DEVICE']}; wall {time.time() - t0:.0f} s; s/edit = this stretch's wall "
             f"time over its edits, all runs sharing the device",
             f"packed in {', '.join(p.name for p in parts) or 'nothing'}: "
             + (", ".join(_shown(p) for p in carry if p not in left) or "nothing"),
             *[f"left out (over the size limit): {_shown(p)}" for p in left],
             *(_send_lines(a.stage, sent, rest) if a.stage else [])]
    (a.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    with tarfile.open(a.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    return 0 if all(c in (0, PAUSED) for c in codes.values()) else FAILED


if __name__ == "__main__":
    sys.exit(main())
