"""Runs of a profile side by side on Dask give the same files as one after another; a run that
fails is reported and does not stop the others; a run whose worker was killed resumes from its
checkpoint when the command is run again and ends as an uninterrupted run does."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from repro import study
from repro.core.store import read_netcdf, state_path

CHEAP = "{layer: 1, v_steps: 2, stats_tokens: 2000, n_prefix_short: 1, n_prefix_long: 1}"
FIELDS = ("weight_norm", "nll_new", "nll_true", "efficacy", "probe_ppl")


def profile(tmp_path, tiny_dir, out: str, editors=("rome", "r-rome", "ft-m"), n_edits: int = 2, extra: str = ""):
    lines = ["p:"]
    for editor in editors:
        hp = CHEAP if editor != "ft-m" else "{layer: 1, steps: 2}"
        lines.append(f"""  - id: {editor}_tiny
    notebook: notebooks/sequential_editing.ipynb
    parameters: {{model: "{tiny_dir}", editor: {editor}, n_edits: {n_edits}, measure_every: 0,
                 checkpoint_every: 1, hparams: {hp}, output: "{tmp_path / out / editor}.nc"{extra}}}""")
    path = tmp_path / f"{out}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(path, tmp_path, *flags):
    return study.main(["--profile", "p", "--file", str(path), "--executed", str(tmp_path / "executed"), *flags])


def same_files(a, b):
    """Equal up to float rounding: a worker's kernel gets cpus/N threads, the serial one all of
    them, and a different thread count sums in another order (measured: 1e-7 relative)."""
    for name in ("rome", "r-rome", "ft-m"):
        x, y = read_netcdf(a / f"{name}.nc"), read_netcdf(b / f"{name}.nc")
        for field in FIELDS:
            np.testing.assert_allclose(x[field].values, y[field].values, rtol=1e-5, err_msg=f"{name}: {field}")


def test_two_workers_make_the_same_files_as_one_after_another(tmp_path, tiny_dir, capsys):
    assert run(profile(tmp_path, tiny_dir, "serial"), tmp_path) == 0
    assert run(profile(tmp_path, tiny_dir, "dask"), tmp_path, "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "[dask] 3 runs on 2 workers" in out and "[3/3 finished, 0 running, 0 failed]" in out
    same_files(tmp_path / "serial", tmp_path / "dask")


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path, tiny_dir, capsys):
    path = profile(tmp_path, tiny_dir, "mixed", editors=("rome", "ft-m"))
    text = path.read_text().replace("{layer: 1, steps: 2}", "{layer: 99, steps: 2}")  # ft-m: no layer 99
    path.write_text(text)
    assert run(path, tmp_path, "--workers", "2") == 1
    out = capsys.readouterr()
    assert "FAILED ft-m_tiny" in out.out and "layer 99" in out.out and ".ft-m_tiny.ipynb.tmp.ipynb" in out.out
    assert (tmp_path / "mixed" / "rome.nc").exists() and not (tmp_path / "mixed" / "ft-m.nc").exists()
    assert "rerun the same command" in out.err


def test_a_killed_worker_resumes_to_the_uninterrupted_result(tmp_path, tiny_dir):
    """The worker (and its notebook kernel) is killed once the run has checkpointed; rerunning the
    command resumes the run from its state file, and the file equals an uninterrupted run's."""
    psutil = pytest.importorskip("psutil")
    whole = profile(tmp_path, tiny_dir, "whole", editors=("rome",), n_edits=6)
    assert run(whole, tmp_path) == 0
    cut = profile(tmp_path, tiny_dir, "cut", editors=("rome",), n_edits=6)
    state = state_path(tmp_path / "cut" / "rome.nc")
    me = psutil.Process()

    killed = []

    def kill_when_checkpointed():
        deadline = time.time() + 300
        while time.time() < deadline and not state.exists():
            time.sleep(0.1)
        kernels = [p for p in me.children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]
        workers = {k.parent() for k in kernels}
        for proc in kernels + [w for w in workers if w is not None]:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
            except ProcessLookupError:
                pass

    killer = threading.Thread(target=kill_when_checkpointed)
    killer.start()
    first = run(cut, tmp_path, "--workers", "1")
    killer.join()
    if not killed:
        pytest.skip("the run finished before its worker could be killed")
    if first != 0:  # Dask gave up on the task: the command is run again
        assert run(cut, tmp_path, "--workers", "1") == 0
    # either way the run went on from its checkpoint, in a second stretch
    x, y = read_netcdf(tmp_path / "whole" / "rome.nc"), read_netcdf(tmp_path / "cut" / "rome.nc")
    assert len(json.loads(y.attrs["git_shas_by_segment"])) >= 2 and not state.exists()
    for field in FIELDS:
        np.testing.assert_allclose(x[field].values, y[field].values, rtol=1e-5, err_msg=field)


def test_the_smoke_profile_on_two_workers_makes_the_same_files(tmp_path, capsys):
    """The real smoke profile (every kind of notebook, SmolLM2-135M), its outputs moved to a
    temporary folder: two Dask workers give the files one run after another gives."""
    import yaml

    from repro.core.paths import from_root

    def moved(mode: str):
        runs = yaml.safe_load(from_root("study.yaml").read_text())["smoke"]
        for r in runs:
            for key in ("output", "weights"):
                if key in r["parameters"]:
                    r["parameters"][key] = str(tmp_path / mode / os.path.basename(r["parameters"][key]))
        path = tmp_path / f"{mode}.yaml"
        path.write_text(yaml.safe_dump({"p": runs}))
        return path, [r["parameters"]["output"] for r in runs]

    serial, outputs = moved("serial")
    dask, _ = moved("dask")
    assert run(serial, tmp_path) == 0
    assert run(dask, tmp_path, "--workers", "2") == 0
    assert f"[{len(outputs)}/{len(outputs)} finished, 0 running, 0 failed]" in capsys.readouterr().out
    for out in outputs:
        x = read_netcdf(out)
        y = read_netcdf(out.replace("/serial/", "/dask/"))
        numeric = [v for v in x.data_vars if x[v].dtype.kind in "fiu" and "second" not in v and "time" not in v]
        assert numeric and set(numeric) <= set(y.data_vars)
        for v in numeric:  # up to float rounding (kernels with other thread counts)
            np.testing.assert_allclose(x[v].values, y[v].values, rtol=1e-4, atol=1e-6, err_msg=f"{out}: {v}")
