"""Run files: xarray Datasets written as compressed NetCDF (netcdf4 engine), atomically, with
provenance attributes (parameters, git sha, package versions, device, wall time)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import xarray as xr

PROVENANCE_PACKAGES = ("torch", "transformers", "peft", "xarray", "netCDF4", "numpy", "normgrowth")


def git_sha(cwd: str | Path | None = None) -> str:
    """The commit of the working tree, with ``-dirty`` when it has uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance(params: dict, device: str, **extra) -> dict[str, str | int | float]:
    """NetCDF-safe attrs (strings and numbers only; dicts as JSON)."""
    attrs = {
        "params": json.dumps(params, sort_keys=True, default=str),
        "git_sha": git_sha(),
        "packages": json.dumps(package_versions(), sort_keys=True),
        "device": device,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host_platform": platform.platform(),
    }
    for key, value in extra.items():
        attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
    return attrs


def state_path(output: str | Path) -> Path:
    """Where an interrupted run keeps its resume state: ``<output>.state.pt`` beside the run file."""
    output = Path(output)
    return output.with_name(output.name + ".state.pt")


def save_state(path: str | Path, state: dict) -> None:
    """``torch.save`` the resume state via a temporary file and a rename (never half written)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_netcdf(ds: xr.Dataset, path: str | Path) -> Path:
    """Write ``ds`` to ``path`` via a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = {
        name: {"zlib": True, "complevel": 4}
        for name, var in ds.data_vars.items()
        if var.dtype.kind in "fiub"
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_netcdf(path: str | Path) -> xr.Dataset:
    """Load a run file fully into memory (and close it), so that it can be rewritten later."""
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return ds.load()


def run_params(ds: xr.Dataset) -> dict:
    """The parameters a run file was made with."""
    return json.loads(ds.attrs["params"])


def existing_run(path: str | Path, params: dict, overwrite: bool = False) -> xr.Dataset | None:
    """The finished run at ``path`` when it was made with ``params`` (None when absent or when
    ``overwrite``); a run made with other parameters is an error rather than silently replaced."""
    path = Path(path)
    if overwrite or not path.exists():
        return None
    done = read_netcdf(path)
    if run_params(done) != json.loads(json.dumps(params, sort_keys=True, default=str)):
        raise FileExistsError(f"{path} exists with other parameters; pass overwrite=True to replace it")
    return done
