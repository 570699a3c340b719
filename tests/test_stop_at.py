"""``python -m repro.study --stop-at WHEN``: the deadline's forms, bad input, and what the command
does at it (a sequential run pauses with its state saved, later runs wait, exit status 3, and the
same command resumes them); the Dask path reports a paused run as paused, not failed."""
from __future__ import annotations

import datetime as dt
import time

import pytest
from papermill.exceptions import PapermillExecutionError

from repro import study
from repro.core import deadline
from repro.core.store import read_netcdf, state_path
from repro.study import parallel

NOW = dt.datetime(2026, 12, 6, 9, 0, 0).timestamp()  # local time, as the clock forms are read


@pytest.mark.parametrize("text,expected", [
    ("09:45", dt.datetime(2026, 12, 6, 9, 45).timestamp()),   # later today
    ("8:30", dt.datetime(2026, 12, 7, 8, 30).timestamp()),    # passed today: tomorrow
    ("09:00", dt.datetime(2026, 12, 7, 9, 0).timestamp()),    # now counts as passed
    ("2026-12-06 10:15", dt.datetime(2026, 12, 6, 10, 15).timestamp()),
    ("2026-12-06T10:15:30+00:00", dt.datetime(2026, 12, 6, 10, 15, 30, tzinfo=dt.timezone.utc).timestamp()),
    ("+90m", NOW + 5400), ("+2.5h", NOW + 9000), ("+30s", NOW + 30), (" +1h ", NOW + 3600),
    ("1765000000", 1765000000.0), ("1765000000.5", 1765000000.5),
])
def test_deadline_forms(text, expected):
    assert study.deadline_from(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["soon", "", "25:00", "9:75", "+5d", "+h", "60", "2026-13-01 10:00"])
def test_a_malformed_deadline_is_refused(text):
    with pytest.raises(ValueError):
        study.deadline_from(text, now=NOW)


@pytest.mark.parametrize("text", ["+1h", "09:45", "2026-12-06 10:15", "1765000000.5"])
def test_a_run_reads_its_deadline_from_the_environment_as_the_command_reads_the_flag(text, monkeypatch):
    from repro.runs.sequential import _deadline

    clock = lambda: NOW  # noqa: E731 -- the clock both readings anchor to
    monkeypatch.setenv("NORMGROWTH_STOP_AT", f" {text} ")
    assert _deadline(None, clock) == pytest.approx(study.deadline_from(text, now=NOW))
    assert _deadline(NOW + 7.0, clock) == NOW + 7.0  # a deadline given to the run wins over the environment
    monkeypatch.setenv("NORMGROWTH_STOP_AT", "in a while")
    with pytest.raises(ValueError, match="NORMGROWTH_STOP_AT: a deadline is HH:MM"):
        _deadline(None, clock)


def test_the_clock_is_read_only_where_the_deadline_needs_it(monkeypatch):
    def no_clock():
        raise AssertionError("read the clock")

    assert deadline.parse("1765000000", no_clock) == 1765000000.0
    assert deadline.parse("2026-12-06 10:15", no_clock) == dt.datetime(2026, 12, 6, 10, 15).timestamp()
    monkeypatch.setenv("NORMGROWTH_STOP_AT", "  ")
    assert deadline.from_env(no_clock) is None
    deadline.to_env(1765000000.25)  # what the command hands its kernels: epoch seconds, read back exactly
    assert deadline.from_env(no_clock) == 1765000000.25
    with pytest.raises(AssertionError, match="read the clock"):
        deadline.parse("+5m", no_clock)


def test_a_malformed_deadline_is_a_usage_error_before_anything_runs(monkeypatch, capsys):
    monkeypatch.setattr(study, "execute", lambda *a, **k: pytest.fail("ran with a malformed deadline"))
    with pytest.raises(SystemExit) as exit_:
        study.main(["--profile", "smoke", "--stop-at", "after lunch"])
    assert exit_.value.code == 2 and "--stop-at takes HH:MM" in capsys.readouterr().err
    monkeypatch.setenv("NORMGROWTH_STOP_AT", "soon")
    with pytest.raises(SystemExit) as exit_:
        study.main(["--profile", "smoke"])
    assert exit_.value.code == 2 and "NORMGROWTH_STOP_AT" in capsys.readouterr().err


def _profile(tmp_path, tiny_dir):
    lines = ["p:"]
    for editor in ("rome", "r-rome"):
        lines.append(f"""  - id: {editor}_tiny
    notebook: notebooks/sequential_editing.ipynb
    parameters: {{model: "{tiny_dir}", editor: {editor}, n_edits: 3, measure_every: 0, checkpoint_every: 1,
                 hparams: {{layer: 1, v_steps: 2, stats_tokens: 2000, n_prefix_short: 1, n_prefix_long: 1}},
                 output: "{tmp_path}/{editor}.nc"}}""")
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_run_pauses_at_the_deadline_the_next_waits_and_the_same_command_resumes(tmp_path, tiny_dir,
                                                                                  monkeypatch, capsys):
    monkeypatch.setenv("NORMGROWTH_STOP_AT", "")  # main sets it for the kernels; restored after the test
    argv = ["--profile", "p", "--file", str(_profile(tmp_path, tiny_dir)), "--executed", str(tmp_path / "ex")]
    # a deadline already past for the first run's kernel, which pauses after its first edit; the
    # command's own check sees it still ahead before the first run and passed before the second
    deadline = time.time() - 1
    checks = iter([deadline - 1, deadline + 1])
    monkeypatch.setattr(study, "_now", lambda: next(checks))
    assert study.main([*argv, "--stop-at", repr(deadline)]) == study.PAUSED
    captured = capsys.readouterr()
    assert "[paused] rome_tiny" in captured.out and "paused at its deadline after 1 of 3 edits" in captured.out
    assert "[wait] r-rome_tiny: not started, the deadline has passed" in captured.out
    assert "2 run(s) paused or left for later" in captured.err
    assert state_path(tmp_path / "rome.nc").exists() and not (tmp_path / "rome.nc").exists()
    assert not (tmp_path / "r-rome.nc").exists()

    monkeypatch.setenv("NORMGROWTH_STOP_AT", "")
    monkeypatch.setattr(study, "_now", lambda: pytest.fail("checked a deadline that was not set"))
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert "[done] rome_tiny" in out and "[done] r-rome_tiny" in out
    rome = read_netcdf(tmp_path / "rome.nc")
    assert int(rome.attrs["n_edits_done"]) == 3 and rome.attrs["stop_reason"] == "completed"
    assert not state_path(tmp_path / "rome.nc").exists()


def test_the_dask_path_reports_paused_and_not_started_runs_not_failed(tmp_path, monkeypatch):
    run = study.Run("r", "notebooks/sequential_editing.ipynb", {"output": f"{tmp_path}/r.nc"})
    monkeypatch.setenv("NORMGROWTH_STOP_AT", "")
    monkeypatch.setattr(study, "_now", lambda: 100.0)
    monkeypatch.setattr(study, "execute", lambda *a, **k: pytest.fail("started after the deadline"))
    late = parallel.run_one(run, False, None, 0, stop_at=50.0)
    assert (late.status, late.error) == ("not started", "the deadline has passed")

    def pauses(*a, **k):
        raise PapermillExecutionError(3, 1, "run(...)", "Paused",
                                      "r.nc: paused at its deadline after 10 of 30 edits; the state is saved", [])

    monkeypatch.setattr(study, "execute", pauses)
    outcome = parallel.run_one(run, False, None, 0, stop_at=150.0)
    assert outcome.status == "paused" and outcome.error.startswith("r.nc: paused at its deadline after 10")

    def fails(*a, **k):
        raise PapermillExecutionError(3, 1, "run(...)", "ValueError", "no layer 99", [])

    monkeypatch.setattr(study, "execute", fails)
    assert parallel.run_one(run, False, None, 0, stop_at=150.0).status == "failed"
