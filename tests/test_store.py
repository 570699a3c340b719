"""Run files: atomic NetCDF writes with provenance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from repro import store


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


def test_failed_write_leaves_no_file(tmp_path):
    ds = xr.Dataset({"bad": ("x", np.array([object()], dtype=object))})
    with pytest.raises(Exception):
        store.write_netcdf(ds, tmp_path / "run.nc")
    assert list(tmp_path.iterdir()) == []
