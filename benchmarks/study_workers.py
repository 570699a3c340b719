"""Wall time of a profile's runs executed one after another and side by side on a local Dask cluster.

Runs ``python -m repro.study --profile P --force --workers N`` for each ``N`` (``0``: the serial
runner, without Dask) and prints a table of wall times and the speed-up over the first setting.
Every setting reruns every run of the profile (``--force``), so the settings do the same work;
the serial runner's kernels use all cores, each of N workers' kernels ``cores / N``.

    python benchmarks/study_workers.py                          # smoke profile: serial, 1 and 2 workers
    python benchmarks/study_workers.py --profile smoke --workers 0 2

Run it alone on the machine: other jobs on the same cores distort the comparison. The smoke
profile's runs are minutes each; the default profile's missing runs are long runs of many hours,
whose side-by-side gain is bounded by the same share of cores measured here.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_profile(profile: str, workers: int) -> tuple[float, int]:
    """Seconds the study command took, and its exit status."""
    cmd = [sys.executable, "-m", "repro.study", "--profile", profile, "--force"]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return seconds, done.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="settings to time: 0 is the serial runner, N a Dask cluster of N workers")
    args = ap.parse_args(argv)
    if any(w < 0 for w in args.workers):
        ap.error("--workers must be >= 0")
    rows = []
    for workers in args.workers:
        seconds, rc = run_profile(args.profile, workers)
        rows.append((workers, seconds, rc))
        print(f"  {'serial' if workers == 0 else f'{workers} worker(s)'}: {seconds:.0f} s (exit {rc})", flush=True)
    base = rows[0][1]
    print(f"\nprofile {args.profile!r} on {os.cpu_count()} cores, every run forced")
    print(f"{'setting':<14} {'wall s':>8} {'speed-up':>9} {'exit':>5}")
    for workers, seconds, rc in rows:
        label = "serial" if workers == 0 else f"{workers} worker(s)"
        print(f"{label:<14} {seconds:>8.0f} {base / seconds:>8.2f}x {rc:>5}")
    return max(rc for _, _, rc in rows)


if __name__ == "__main__":
    sys.exit(main())
