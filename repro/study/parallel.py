"""Runs of a profile side by side on Dask (``python -m repro.study --workers N`` or ``--scheduler
ADDRESS``): one run per task, each executing its notebook with papermill in a worker process.

On one machine a ``dask.distributed`` LocalCluster starts ``N`` worker processes with one task
thread each; every run's kernel gets ``cpus // N`` threads (``OMP_NUM_THREADS``) so that the
workers do not fight over cores, and, where GPUs exist, worker *i* runs on GPU *i mod count*. On a
cluster, ``--scheduler`` submits to an existing Dask scheduler (e.g. one started by
``dask-jobqueue``'s ``SLURMCluster``, see the README). A failed run is reported with its error and
the path of its partly executed notebook, and does not stop the others; rerunning the command
resumes the failed and unfinished runs from their checkpoints. With a deadline (``--stop-at``) each
worker's runs pause at it, and a run whose turn comes after it is not started.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from repro.core import deadline


@dataclass
class Outcome:
    id: str
    status: str  # "done", "failed", "paused" (at the deadline) or "not started" (its turn came after it)
    seconds: float
    error: str = ""  # a failed run's error, or a paused one's message
    log: str = ""  # the run's executed (or partly executed) notebook


def run_one(run, force: bool, threads: int | None, n_gpus: int, stop_at: float | None = None) -> Outcome:
    """Execute ``run`` here (inside a Dask worker): its kernel inherits the thread count, device and
    deadline."""
    from repro import study

    if study.too_late(stop_at):
        return Outcome(run.id, "not started", 0.0, "the deadline has passed")
    if stop_at is not None:
        deadline.to_env(stop_at)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    if n_gpus:
        try:
            from distributed import get_worker

            index = int(str(get_worker().name).rsplit("-", 1)[-1])
        except (ImportError, ValueError):
            index = 0
        os.environ["NORMGROWTH_DEVICE"] = f"cuda:{index % n_gpus}"
    t0 = time.perf_counter()
    try:
        study.execute(run, force=force)
    except Exception as err:  # reported, never raised: one failed run must not stop the others
        if study.paused(err):
            return Outcome(run.id, "paused", time.perf_counter() - t0, study.pause_message(err))
        partial = run.executed.with_name(f".{run.executed.name}.tmp.ipynb")
        message = str(err).strip().splitlines()
        return Outcome(run.id, "failed", time.perf_counter() - t0,
                       f"{type(err).__name__}: {message[-1] if message else ''}"[:500], str(partial))
    return Outcome(run.id, "done", time.perf_counter() - t0, log=str(run.executed))


def run_parallel(jobs: list[tuple[object, bool]], workers: int | None = None, scheduler: str | None = None,
                 echo=print, stop_at: float | None = None) -> list[Outcome]:
    """Run ``jobs`` ((run, force) pairs) on Dask; print progress as runs finish; return the outcomes
    in the order they finished."""
    from distributed import Client, LocalCluster, as_completed

    n_gpus = 0
    try:
        import torch

        n_gpus = torch.cuda.device_count()
    except ImportError:
        pass
    cluster = None
    if scheduler:
        client, threads = Client(scheduler), None
    else:
        workers = workers or 1
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        client, threads = Client(cluster), max(1, (os.cpu_count() or 1) // workers)
    outcomes: list[Outcome] = []
    try:
        echo(f"[dask] {len(jobs)} runs on {len(client.scheduler_info()['workers'])} workers; "
             f"dashboard: {client.dashboard_link}")
        futures = [client.submit(run_one, run, force, threads, n_gpus, stop_at,
                                 key=f"run-{run.id}-{time.time_ns()}", pure=False) for run, force in jobs]
        for future in as_completed(futures):
            run = jobs[futures.index(future)][0]
            try:
                outcome = future.result()
            except Exception as err:  # the worker died (e.g. killed or out of memory)
                outcome = Outcome(run.id, "failed", 0.0, f"{type(err).__name__}: {err}"[:500])
            outcomes.append(outcome)
            failed = sum(o.status == "failed" for o in outcomes)
            running = sum(not f.done() for f in futures)
            head = f"[{len(outcomes)}/{len(jobs)} finished, {running} running, {failed} failed]"
            if outcome.status == "done":
                echo(f"{head} done {outcome.id} in {outcome.seconds:.0f} s")
            elif outcome.status == "paused":
                echo(f"{head} paused {outcome.id} after {outcome.seconds:.0f} s: {outcome.error}")
            elif outcome.status == "not started":
                echo(f"{head} not started {outcome.id}: {outcome.error}")
            else:
                echo(f"{head} FAILED {outcome.id}: {outcome.error}" + (f" (log: {outcome.log})" if outcome.log else ""))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return outcomes
