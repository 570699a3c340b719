"""scripts/device_runs.py: the parameters it gives a run are the notebook's, and what it packs fits
the size limits without losing what it keeps."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path
import sys
import tarfile

import pytest

from repro.core.paths import ROOT

spec = importlib.util.spec_from_file_location("device_runs", ROOT / "scripts" / "device_runs.py")
device_runs = importlib.util.module_from_spec(spec)
sys.modules["device_runs"] = device_runs  # its dataclass looks its module up
spec.loader.exec_module(device_runs)


def test_a_run_gets_the_parameters_its_notebook_would_build():
    p = device_runs.run_params("rome_smollm2-135m_n3000")
    assert (p.editor, p.n_edits, p.batch_size, p.facts) == ("rome", 3000, 1, "data/facts/smollm2-135m-long.json")
    assert p.measure_at == [50, 100, 250, 500, 1000, 2000, 3000] and p.device is None
    with pytest.raises(ValueError, match="no run"):
        device_runs.run_params("rome_smollm2-135m_n9")
    with pytest.raises(ValueError, match="not a sequential"):
        device_runs.run_params("layer_sweep_rome_smollm2-135m")


def test_pack_splits_in_order_and_leaves_out_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(device_runs, "ROOT", tmp_path)
    files = []
    for name, size in (("a.bin", 3000), ("b.bin", 9000), ("c.bin", 2000)):
        f = tmp_path / name
        f.write_bytes(bytes([len(files) + 1]) * size)
        files.append(f)
    parts, left = device_runs.pack(files, tmp_path / "out" / "results.tar", 4096, 18000)
    assert left == [files[1]]  # b would take the total over 18000 bytes; c still fits after it
    assert [p.name for p in parts] == [f"results.tar.{i:02d}" for i in range(len(parts))] and len(parts) > 1
    assert all(p.stat().st_size <= 4096 for p in parts)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        assert tar.getnames() == ["a.bin", "c.bin"]
        assert tar.extractfile("c.bin").read() == files[2].read_bytes()


def test_staged_parts_go_out_over_several_returns_and_rebuild_the_files(tmp_path, monkeypatch, capsys):
    """A file larger than one return is not left out when staged: the parts leave in order, at most
    the limit per call, each once, and together they are the whole tar."""
    monkeypatch.setattr(device_runs, "ROOT", tmp_path)
    big = tmp_path / "big.state.pt"
    big.write_bytes(bytes(range(256)) * 100)  # 25,600 bytes
    stage = tmp_path / "stage"
    parts, left = device_runs.pack([big], stage / "results.tar", 4096, 2**62)
    n = len(parts)
    assert left == [] and n > 6 and all(p.stat().st_size <= 4096 for p in parts)
    outs, calls = [], -(-n // 2)
    for call in range(calls):
        out = tmp_path / f"out{call}"
        sent, rest = device_runs.send(stage, out, 9000, 6)  # two parts of 4096 fit in 9000 bytes
        outs.append(sorted(out.glob("results.tar.*")))
        assert [p.name for p in sent] == [p.name for p in outs[-1]]
        assert len(rest) == max(0, n - 2 * (call + 1))
    assert [len(o) for o in outs[:-1]] == [2] * (calls - 1) and len(outs[-1]) in (1, 2)
    whole = b"".join(p.read_bytes() for o in outs for p in o)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        assert tar.extractfile("big.state.pt").read() == big.read_bytes()
    # nothing more to send; a call through the command line says so
    assert device_runs.main(["--send", str(stage), "--out", str(tmp_path / "last")]) == 0
    assert "all parts" in capsys.readouterr().out and not any((tmp_path / "last").glob("results.tar.*"))
    # the file-count limit binds too, and a part larger than one return is an error, not a skip
    (stage / "sent.txt").unlink()
    assert len(device_runs.send(stage, tmp_path / "out5", 10**6, 3)[0]) == 3
    with pytest.raises(ValueError, match="larger than one return"):
        device_runs.send(stage, tmp_path / "out6", 1000, 6)


def test_bad_arguments_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        device_runs.main([])
    with pytest.raises(SystemExit):
        device_runs.main(["rome_smollm2-135m_n3000", "--minutes", "0"])
    assert "--minutes must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        device_runs.main(["--send", "/nonexistent/stage"])
    assert "no staged parts" in capsys.readouterr().err


def test_runs_go_to_their_deadline_and_come_back_packed(tmp_path, tiny_dir, monkeypatch):
    """End to end on the CPU: two runs of a tiny model, one short enough to finish, one paused at the
    deadline; what comes back resumes to the same file as a run made in one go."""
    import json

    import numpy as np
    import yaml

    from repro.runs.sequential import SequentialParams, run_sequential

    hp = {"layer": 1, "v_steps": 2, "stats_tokens": 2000, "n_prefix_short": 1, "n_prefix_long": 1}
    base = dict(model=tiny_dir, editor="rome", seed=0, measure_every=0, checkpoint_every=1, hparams=hp)
    runs = [{"id": rid, "notebook": "notebooks/sequential_editing.ipynb",
             "parameters": {**base, "n_edits": n, "output": str(tmp_path / "runs" / f"{rid}.nc")}}
            for rid, n in (("short", 1), ("long", 3))]
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(yaml.safe_dump({"t": runs}))
    monkeypatch.setenv("NORMGROWTH_DEVICE", "cpu")
    out = tmp_path / "out"
    # a deadline shorter than one edit: each run makes one batch, then stops
    assert device_runs.main(["short", "long", "--profile", "t", "--profiles", str(profiles),
                             "--minutes", "0.001", "--out", str(out), "--stage", str(tmp_path / "stage"),
                             "--part-mib", "0.01", "--total-mib", "0.02"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "finished" in summary.splitlines()[1] and "paused" in summary.splitlines()[2]
    parts = sorted(out.glob("results.tar.*"))
    assert len(parts) == 2 and "still in" in summary  # the states are larger than one return of 0.02 MiB
    for call in range(100):  # later calls bring the rest
        more = tmp_path / f"more{call}"
        assert device_runs.main(["--send", str(tmp_path / "stage"), "--out", str(more), "--total-mib", "0.02"]) == 0
        parts += sorted(more.glob("results.tar.*"))
        if not any(more.glob("*")):
            break
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        names = tar.getnames()
        assert sorted(Path(n).name for n in names) == ["long.nc.state.pt", "short.nc"]
        back = tmp_path / "back"
        tar.extractall(back, filter="data")
    state = next(back.rglob("long.nc.state.pt"))
    (tmp_path / "runs" / "long.nc.state.pt").write_bytes(state.read_bytes())  # as if carried back here
    p = SequentialParams(**{**base, "n_edits": 3, "output": str(tmp_path / "runs" / "long.nc")})
    resumed = run_sequential(p, progress=False)
    whole = run_sequential(SequentialParams(**{**base, "n_edits": 3, "output": str(tmp_path / "whole.nc")}),
                           progress=False)
    np.testing.assert_allclose(resumed["weight_norm"], whole["weight_norm"], rtol=1e-6)
    assert json.loads(resumed.attrs["segment_starts"]) == [0, 1]
