"""Run files: atomic NetCDF writes with provenance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from repro.core import store


def test_roundtrip_with_provenance(tmp_path):
    ds = xr.Dataset({"weight_norm": (("step", "layer"), np.arange(6.0).reshape(2, 3))},
                    coords={"step": [0, 1], "layer": [0, 1, 2]})
    ds.attrs.update(store.provenance({"n_edits": 1, "editor": "rome"}, "cpu", run_id="x", edited=[[4, "mlp_down"]]))
    path = store.write_netcdf(ds, tmp_path / "run.nc")
    back = store.read_netcdf(path)
    xr.testing.assert_equal(back, ds)
    assert store.run_params(back) == {"n_edits": 1, "editor": "rome"}
    assert json.loads(back.attrs["packages"])["xarray"] == xr.__version__
    assert back.attrs["device"] == "cpu" and back.attrs["git_sha"]
    assert json.loads(back.attrs["edited"]) == [[4, "mlp_down"]]
    assert [p.name for p in tmp_path.iterdir()] == ["run.nc"]  # no temporary left behind


def test_run_params_without_params_raises_unless_missing_ok():
    bare = xr.Dataset(attrs={"editor": "rome"})
    with pytest.raises(KeyError):
        store.run_params(bare)
    assert store.run_params(bare, missing_ok=True) == {}
    made = xr.Dataset(attrs={"params": json.dumps({"n_edits": 3})})
    assert store.run_params(made, missing_ok=True) == {"n_edits": 3}


def test_failed_write_leaves_no_file(tmp_path):
    ds = xr.Dataset({"bad": ("x", np.array([object()], dtype=object))})
    with pytest.raises(Exception):
        store.write_netcdf(ds, tmp_path / "run.nc")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("false", False), ("False", False),
                                            ("TRUE", True), ("yes", True), ("0", False), ("1", True)])
def test_booleans_from_papermill_strings_are_parsed(value, expected):
    assert store.parse_bool(value, "overwrite") is expected


@pytest.mark.parametrize("value", ["flase", "", 2, None, "on"])
def test_other_values_are_refused_not_truthy(value):
    with pytest.raises(ValueError, match="overwrite"):
        store.parse_bool(value, "overwrite")


def test_a_second_writer_fails_at_once_and_a_stale_lock_is_taken_over(tmp_path):
    import json
    import os
    import platform
    import subprocess

    out = tmp_path / "run.nc"
    with store.RunLock(out):
        assert store.lock_path(out).exists()
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
            store.RunLock(out).__enter__()
    assert not store.lock_path(out).exists()  # released
    proc = subprocess.Popen(["true"])
    proc.wait()
    store.lock_path(out).write_text(json.dumps({"pid": proc.pid, "host": platform.node(), "since": "x"}))
    with store.RunLock(out) as lock:  # its owner is gone: taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    store.lock_path(out).write_text(json.dumps({"pid": 1, "host": "another-host", "since": "x"}))
    with pytest.raises(RuntimeError, match="another-host"):
        store.RunLock(out).__enter__()


def test_the_lock_holder_is_read_without_taking_the_lock(tmp_path):
    import json
    import os
    import platform

    out = tmp_path / "run.nc"
    lock = store.RunLock(out)
    assert lock.holder() == ("free", None)
    with store.RunLock(out):
        status, owner = lock.holder()
        assert status == "alive" and owner["pid"] == os.getpid()
    for text in ("not json", "[1, 2]"):
        store.lock_path(out).write_text(text)
        assert lock.holder() == ("unknown", None)
        with pytest.raises(RuntimeError, match="unknown process"):
            store.RunLock(out).__enter__()
        assert store.lock_path(out).read_text() == text  # never taken over
    store.lock_path(out).write_text(json.dumps({"host": platform.node(), "since": "x"}))  # no pid
    assert lock.holder()[0] == "stale"


def test_a_damaged_run_file_is_named(tmp_path):
    bad = tmp_path / "broken.nc"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(OSError, match="broken.nc cannot be read"):
        store.read_netcdf(bad)


def test_a_finished_run_made_with_other_parameters_is_never_silently_replaced(tmp_path):
    path = tmp_path / "run.nc"
    store.write_netcdf(xr.Dataset({"x": ("i", [1.0])}, attrs=store.provenance({"n_edits": 3}, "cpu")), path)
    assert store.existing_run(path, {"n_edits": 3}) is not None  # same parameters: reused
    with pytest.raises(FileExistsError, match="other parameters"):
        store.existing_run(path, {"n_edits": 4})
    assert store.existing_run(path, {"n_edits": 4}, overwrite=True) is None  # only when told explicitly


def test_git_sha_dirty_for_code_not_for_run_outputs(tmp_path):
    import subprocess
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    git("config", "user.email", "t@t"); git("config", "user.name", "t")
    (tmp_path / "data" / "runs").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "data" / "runs" / "a.nc.state.pt").write_text("state 1")
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "_toc.yml").write_text("runs: []\n")
    (tmp_path / "book" / "intro.md").write_text("intro\n")
    git("add", "-A"); git("commit", "-q", "-m", "c")
    clean = store.git_sha(tmp_path)
    assert len(clean) == 40
    (tmp_path / "data" / "runs" / "a.nc.state.pt").write_text("state 2")   # a run going on
    assert store.git_sha(tmp_path) == clean
    (tmp_path / "data" / "runs" / "a.nc.state.pt").unlink()                # a run that finished
    assert store.git_sha(tmp_path) == clean
    (tmp_path / "book" / "_toc.yml").write_text("runs: [a]\n")             # ...and the runner listed it
    assert store.git_sha(tmp_path) == clean
    (tmp_path / "book" / "intro.md").write_text("more\n")                  # other book pages are not outputs
    assert store.git_sha(tmp_path) == clean + "-dirty"
    git("checkout", "--", "book/intro.md")
    (tmp_path / "code.py").write_text("x = 2\n")                           # the code changed
    assert store.git_sha(tmp_path) == clean + "-dirty"


def test_committed_run_files_come_from_a_clean_tree():
    """Every NetCDF file the repository holds records the full sha of a commit with no uncommitted
    change to the code (no ``-dirty``): its numbers can be traced to code that exists."""
    import subprocess

    import xarray as xr

    from repro.core.paths import ROOT

    files = subprocess.run(["git", "ls-files", "*.nc"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files, "no committed run files found"
    bad = {}
    for f in files:
        with xr.open_dataset(ROOT / f, engine="netcdf4") as ds:
            sha = str(ds.attrs.get("git_sha", ""))
        if len(sha.removesuffix("-dirty")) != 40 or sha.endswith("-dirty"):
            bad[f] = sha
    assert not bad, f"run files not made from a clean commit: {bad}"


def test_git_sha_of_a_copied_tree_is_the_one_its_maker_names(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMGROWTH_GIT_SHA", raising=False)
    assert store.git_sha(tmp_path) == "unknown"  # tmp_path is no repository
    assert len(store.git_sha()) >= 40  # a checkout: git answers
    monkeypatch.setenv("NORMGROWTH_GIT_SHA", "abc123")
    assert store.git_sha(tmp_path) == "abc123"
    assert store.git_sha() == "abc123"  # also where stale git metadata travelled with the copy


def _bits(t):
    """A tensor's bytes, to compare floats bit for bit (NaN payloads and signed zeros included)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_packed_tensors_come_back_bit_for_bit(dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    t = (torch.randn(300, 257, generator=g, dtype=torch.float64) * 1e3).to(getattr(torch, dtype))
    t[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")]).to(t.dtype)
    t = t[:, 1:]  # not contiguous
    back = store.unpack_tensor(store.pack_tensor(t))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(_bits(back), _bits(t))


def test_saved_states_pack_large_float_tensors_exactly(tmp_path, monkeypatch):
    """A resume state is saved with its large floating-point tensors packed and loads back exactly:
    nested dicts, lists and tuples kept, small, integer and non-tensor values stored as they are."""
    from collections import OrderedDict

    import torch

    g = torch.Generator().manual_seed(1)
    a = torch.randn(2048 * 9, generator=g, dtype=torch.float64)
    gram = torch.outer(a[:512], a[:512])  # products of one vector: like an editor's Gram matrix
    state = {"weights": [torch.randn(640, 64, generator=g)], "done": 280, "rng": torch.get_rng_state(),
             "editor": {"prev_gram": {1: gram}, "n_prev_keys": 280, "small": torch.ones(3)},
             "module": OrderedDict(w=torch.randn(256, 128, generator=g)), "pair": (a, "text")}
    path = tmp_path / "run.nc.state.pt"
    store.save_state(path, state)
    raw = torch.load(path, weights_only=False)
    assert store.PACKED in raw["editor"]["prev_gram"][1] and store.PACKED in raw["weights"][0]
    assert torch.is_tensor(raw["editor"]["small"]) and torch.is_tensor(raw["rng"])  # left as they are
    back = store.load_state(path)
    assert back["done"] == 280 and back["editor"]["n_prev_keys"] == 280 and back["pair"][1] == "text"
    assert isinstance(back["pair"], tuple) and isinstance(back["module"], OrderedDict)
    for got, want in [(back["editor"]["prev_gram"][1], gram), (back["weights"][0], state["weights"][0]),
                      (back["pair"][0], a), (back["module"]["w"], state["module"]["w"]),
                      (back["rng"], state["rng"]), (back["editor"]["small"], state["editor"]["small"])]:
        assert got.dtype == want.dtype and torch.equal(_bits(got), _bits(want))
    monkeypatch.setattr(store, "PACK_MIN_BYTES", 1 << 40)  # the same state, nothing packed
    store.save_state(tmp_path / "plain.pt", state)
    assert path.stat().st_size < 0.95 * (tmp_path / "plain.pt").stat().st_size


def test_states_saved_before_packing_still_load(tmp_path):
    import torch

    state = {"weights": [torch.randn(512, 512, dtype=torch.float64)], "done": 7}
    path = tmp_path / "old.state.pt"
    torch.save(state, path)  # as states were written before
    back = store.load_state(path)
    assert back["done"] == 7 and torch.equal(back["weights"][0], state["weights"][0])


def test_a_packed_tensor_of_unknown_format_is_an_error():
    import torch

    record = store.pack_tensor(torch.ones(100, 100))
    record[store.PACKED] = "some-later-format"
    with pytest.raises(ValueError, match="some-later-format"):
        store.unpack_tensor(record)
