"""Study profiles: validation and skipping of finished runs."""
from __future__ import annotations

import pytest

from repro import study


def test_default_profile_is_well_formed():
    runs = study.load_profile("default")
    assert {"rome_smollm2-135m_n100", "r-rome_smollm2-135m_n100"} <= {r.id for r in runs}
    for run in runs:
        assert (study.ROOT / run.notebook).exists()
        assert run.parameters["output"].startswith("data/runs/")


def test_unknown_profile_and_malformed_runs(tmp_path):
    with pytest.raises(ValueError, match="known"):
        study.load_profile("nope")
    bad = tmp_path / "s.yaml"
    bad.write_text("p:\n  - id: a\n    notebook: x.ipynb\n    parameters: {}\n")
    with pytest.raises(ValueError, match="parameters.output"):
        study.load_profile("p", bad)


def test_finished_runs_are_skipped(tmp_path, monkeypatch, capsys):
    prof = tmp_path / "s.yaml"
    prof.write_text("p:\n  - id: r1\n    notebook: notebooks/sequential_editing.ipynb\n"
                    f"    parameters: {{output: {tmp_path}/r1.nc}}\n")
    _run_file(tmp_path / "r1.nc", {"output": f"{tmp_path}/r1.nc", "seed": 0})
    monkeypatch.setattr(study, "PROFILES", prof)
    monkeypatch.setattr(study, "EXECUTED", tmp_path)
    (tmp_path / "r1.ipynb").write_text("{}")
    monkeypatch.setattr(study, "execute", lambda *a, **k: pytest.fail("executed a finished run"))
    assert study.main(["--profile", "p"]) == 0
    assert "[skip] r1" in capsys.readouterr().out


def _run_file(path, params):
    import json

    import xarray as xr

    from repro.core.store import write_netcdf

    write_netcdf(xr.Dataset({"x": ("i", [1.0])}, attrs={"params": json.dumps(params)}), path)


SEQ, MEND, POST = "sequential_editing", "train_mend", "post_training"


@pytest.mark.parametrize("notebook,made,declared,stale", [
    (SEQ, {"seed": 0, "n_edits": 3}, "{seed: 0, n_edits: 3}", []),
    (SEQ, {"seed": 0, "n_edits": 3}, "{seed: 1, n_edits: 3}", ["seed"]),
    (MEND, {"seed": 0}, "{seed: 0, n_eval: 20}", []),  # notebook-level parameter the file does not store
    (SEQ, {"seed": 0}, "{seed: 0, measure_every: 20}", ["measure_every"]),  # file predates measurements
    (SEQ, {"seed": 0}, "{seed: 0, measure_every: 0}", []),
    (POST, {"lr": 0.0001}, "{lr: 1.0e-4}", []),
])
def test_runs_made_with_other_parameters_are_stale_and_rerun(tmp_path, monkeypatch, capsys, notebook, made,
                                                             declared, stale):
    prof = tmp_path / "s.yaml"
    out = tmp_path / "r1.nc"
    overwrite = "" if notebook == MEND else "overwrite: false, "
    prof.write_text(f"p:\n  - id: r1\n    notebook: notebooks/{notebook}.ipynb\n"
                    f"    parameters: {{output: {out}, {overwrite}{declared[1:-1]}}}\n")
    _run_file(out, {**made, "output": "elsewhere.nc"})
    monkeypatch.setattr(study, "PROFILES", prof)
    monkeypatch.setattr(study, "EXECUTED", tmp_path)
    (tmp_path / "r1.ipynb").write_text("{}")
    (run,) = study.load_profile("p")
    assert run.stale() == stale
    calls = []
    monkeypatch.setattr(study, "execute", lambda r, force=False: calls.append(force))
    study.main(["--profile", "p"])
    assert calls == ([True] if stale else [])
    study.main(["--profile", "p", "--list"])
    assert ("stale" in capsys.readouterr().out) == bool(stale)


def test_toc_lists_exactly_the_executed_runs(tmp_path, monkeypatch):
    import yaml

    book = tmp_path / "book"
    (book / "runs").mkdir(parents=True)
    toc = book / "_toc.yml"
    toc.write_text(yaml.safe_dump({"format": "jb-book", "root": "intro", "parts": [
        {"caption": "The study", "chapters": [{"file": "setup"}]},
        {"caption": study.RUNS_PART, "chapters": [{"file": "runs/stale"}]},
    ]}))
    monkeypatch.setattr(study, "EXECUTED", book / "runs")
    runs = [study.Run("a", "nb.ipynb", {"output": "data/runs/a.nc"}, "Run A"),
            study.Run("b", "nb.ipynb", {"output": "data/runs/b.nc"})]
    (book / "runs" / "b.ipynb").write_text("{}")
    assert study.sync_toc(runs, toc) == ["b"]
    table = yaml.safe_load(toc.read_text())
    assert table["parts"][0]["chapters"] == [{"file": "setup"}]
    assert table["parts"][1]["chapters"] == [{"file": "runs/b", "title": "Run: b"}]


def test_a_damaged_run_file_is_listed_as_unreadable_not_a_crash(tmp_path, monkeypatch, capsys):
    prof = tmp_path / "s.yaml"
    prof.write_text("p:\n  - id: r1\n    notebook: notebooks/sequential_editing.ipynb\n"
                    f"    parameters: {{output: {tmp_path}/r1.nc, seed: 0}}\n")
    (tmp_path / "r1.nc").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    (tmp_path / "r1.ipynb").write_text("{}")
    monkeypatch.setattr(study, "PROFILES", prof)
    monkeypatch.setattr(study, "EXECUTED", tmp_path)
    assert study.main(["--profile", "p", "--list"]) == 0
    assert "stale" in capsys.readouterr().out and "unreadable r1.nc" in study.load_profile("p")[0].stale()[0]


def test_a_grid_expands_into_runs_with_stable_ids_and_overrides(tmp_path):
    profiles = tmp_path / "study.yaml"
    profiles.write_text("""
g:
  - id: plain
    notebook: notebooks/sequential_editing.ipynb
    parameters: {editor: rome, output: data/runs/plain.nc}
  - grid:
      id: "{editor}_{model}_s{seed}"
      title: "Run: {editor} on {model}, seed {seed}"
      notebook: notebooks/sequential_editing.ipynb
      axes: {editor: [rome, memit], model: [m1, m2], seed: [0, 1]}
      parameters: {n_edits: 10, output: "data/runs/grid/{id}.nc"}
      overrides:
        - where: {editor: memit}
          parameters: {batch_size: 5}
        - where: {editor: rome, model: m2}
          skip: true
""")
    runs = study.load_profile("g", profiles)
    ids = [r.id for r in runs]
    assert ids == ["plain", "rome_m1_s0", "rome_m1_s1", "memit_m1_s0", "memit_m1_s1", "memit_m2_s0", "memit_m2_s1"]
    memit = runs[ids.index("memit_m2_s1")]
    assert memit.parameters == {"n_edits": 10, "output": "data/runs/grid/memit_m2_s1.nc", "editor": "memit",
                                "model": "m2", "seed": 1, "batch_size": 5}
    assert memit.title == "Run: memit on m2, seed 1" and "batch_size" not in runs[1].parameters
    assert [r.id for r in study.load_profile("g", profiles)] == ids  # the same file, the same ids
    profiles.write_text("""
bad:
  - grid: {id: "{nope}", notebook: n.ipynb, axes: {editor: [rome]}, parameters: {output: x.nc}}
""")
    with pytest.raises(ValueError, match="nope"):
        study.load_profile("bad", profiles)


def test_list_shows_how_far_an_unfinished_run_has_got(tmp_path, monkeypatch, capsys):
    import json
    import platform
    import subprocess
    import sys

    import torch

    from repro.core import store

    prof = tmp_path / "s.yaml"
    prof.write_text("p:\n  - id: r1\n    notebook: notebooks/sequential_editing.ipynb\n"
                    f"    parameters: {{output: {tmp_path}/r1.nc, n_edits: 3000}}\n")
    monkeypatch.setattr(study, "PROFILES", prof)
    monkeypatch.setattr(study, "EXECUTED", tmp_path)
    (run,) = study.load_profile("p")

    def listed():
        assert study.main(["--profile", "p", "--list"]) == 0
        return capsys.readouterr().out

    assert run.status() == ("missing", "") and " missing " in listed()
    state = store.state_path(run.output)
    store.save_state(state, {"done": 1510, "rows": []})
    assert run.status() == ("partial", "1,510 of 3,000 edits made")
    out = listed()
    assert "partial" in out and "(1,510 of 3,000 edits made)" in out
    before = state.read_bytes()

    # a live process on this host holds the run's lock: running, with its pid
    with store.RunLock(run.output):
        status, why = run.status()
        assert status == "running" and why.startswith("1,510 of 3,000 edits made;") and "pid" in why
    # a lock left by a process that is gone does not count: partial again
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    store.lock_path(run.output).write_text(json.dumps({"pid": proc.pid, "host": platform.node(), "since": "x"}))
    assert run.status()[0] == "partial"
    assert store.lock_path(run.output).exists()  # looked at, not taken over
    # another host's lock cannot be checked from here: locked
    store.lock_path(run.output).write_text(json.dumps({"pid": 1, "host": "another-host", "since": "x"}))
    assert run.status() == ("locked", "1,510 of 3,000 edits made; pid 1 on another-host")
    store.lock_path(run.output).unlink()

    # an unreadable state is reported and left where it is (load_state would move it aside)
    state.write_bytes(b"not a torch file")
    status, why = run.status()
    assert status == "partial" and why.startswith("unreadable resume state r1.nc.state.pt")
    assert state.read_bytes() == b"not a torch file" and not state.with_name(state.name + ".damaged").exists()
    state.write_bytes(before)
    assert torch.load(state, weights_only=False)["done"] == 1510

    # timed edits give the recent pace (median of the last 100) and the editor time left at it
    rows = [{"edit_seconds": 100.0}] * 5 + [{"edit_seconds": s} for s in [1.0, 2.0, 3.0] * 33 + [2.0]]
    store.save_state(state, {"done": 1510, "rows": rows, "device": "cuda:0"})
    assert run.status() == ("partial", "1,510 of 3,000 edits made; 2 s/edit on cuda:0 over the last 100, "
                                       "so ~0.8 h of editing for the 1,490 left")
    store.save_state(state, {"done": 1510, "rows": rows, "device": "cpu", "threads": [-1, 2, 1]})
    assert run.status()[1].startswith("1,510 of 3,000 edits made; 2 s/edit on cpu (1 thread) over the last 100")
    store.save_state(state, {"done": 1510, "rows": rows, "device": "cpu", "threads": [1, 2]})
    assert "2 s/edit on cpu (2 threads) over" in run.status()[1]
    store.save_state(state, {"done": 2990, "rows": [{"edit_seconds": 3.0}]})
    assert run.status() == ("partial", "2,990 of 3,000 edits made; 3 s/edit over the last 1, "
                                       "so under a minute of editing for the 10 left")
    store.save_state(state, {"done": 2900, "rows": [{"edit_seconds": 3.0}]})
    assert run.status()[1].endswith("so ~5 min of editing for the 100 left")
