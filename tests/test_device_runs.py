"""scripts/device_runs.py: the parameters it gives a run are the notebook's, and what it packs fits
the size limits without losing what it keeps."""
from __future__ import annotations

import importlib.util
import io
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


def test_bad_arguments_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        device_runs.main([])
    with pytest.raises(SystemExit):
        device_runs.main(["rome_smollm2-135m_n3000", "--minutes", "0"])
    assert "--minutes must be positive" in capsys.readouterr().err
